//! Ring-memory inference against resident generation: a model several times the Device budget,
//! generated from with the whole model in memory, through the ring (prefetch by routing, and every
//! expert of each block), and loading each piece on demand; tokens/s per batch size, the stall, the
//! bytes read, median of rounds.

use super::median;
use crate::error::Result;
use crate::infer::weights::WeightSource;
use crate::infer::{BatchDecoder, ModelFile, Prefetch, RingLoad, RingOptions, RingWeights, SampleOptions};
use crate::kernels::Cpu;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One variant at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct RingRow {
    /// "resident", or the ring's prefetch policy and loading ("ring, routed, map").
    pub variant: String,
    /// Sequences decoded together.
    pub batch: usize,
    /// Generated tokens per second over the batch (median of rounds).
    pub tokens_per_s: f64,
    /// Milliseconds the decoder waited for loads per generated token (median).
    pub stall_per_token_ms: f64,
    /// Bytes read from the checkpoint (or copied from the Host tier) per pass (median).
    pub loaded_per_pass: f64,
    /// Routing guesses confirmed, of all guesses of the timed tokens (routed prefetch).
    pub guess_accuracy: Option<f64>,
    /// Every round's tokens/s.
    pub rounds: Vec<f64>,
}

/// What `semoe bench ring` measured.
#[derive(Clone, Debug, Serialize)]
pub struct RingReport {
    /// The checkpoint's size in bytes.
    pub checkpoint_bytes: u64,
    /// The Device budget of the ring.
    pub device_budget: u64,
    /// Sections and their size.
    pub sections: usize,
    /// Bytes of one section.
    pub section_bytes: u64,
    /// Compute threads.
    pub threads: usize,
    /// Tokens per sequence and round.
    pub tokens: usize,
    /// Every variant and batch size.
    pub rows: Vec<RingRow>,
}

/// One round of a ring variant: tokens/s, stall ms per token, bytes loaded per pass, guess accuracy.
type RoundFigures = (f64, f64, f64, Option<f64>);

fn options(tokens: usize, seed: u64) -> SampleOptions {
    SampleOptions {
        max_tokens: tokens,
        temperature: 0.8,
        top_k: 40,
        seed,
    }
}

/// Generate `tokens` bytes for each of `batch` sequences (seeds from `seeds` on); returns the
/// seconds taken.
fn run<S: WeightSource>(decoder: &mut BatchDecoder<S>, batch: usize, tokens: usize, seeds: u64) -> Result<f64> {
    for s in 0..batch {
        decoder.admit(b"ROMEO.\n", &options(tokens, seeds + s as u64))?;
    }
    let started = Instant::now();
    while decoder.active() > 0 {
        decoder.step()?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Tokens per sequence generated before each timed run, resident or ring alike: a server's ring
/// runs for hours, and its first passes (filling the sections, learning which experts the
/// routing favours) are its start-up, as reading the weights into memory is the resident model's.
pub const WARM_UP_TOKENS: usize = 16;

/// The first seed of a round's timed sequences (one per sequence of the batch, up to 2^20).
fn timed_seeds(round: usize) -> u64 {
    (round as u64) << 21
}

/// The first seed of a round's warm-up: other seeds than the timed run's, so that the timed
/// tokens do not replay the passes the warm-up just made.
fn warm_up_seeds(round: usize) -> u64 {
    timed_seeds(round) | 1 << 20
}

/// Measure generation from the checkpoint in `checkpoint`: resident, then each ring variant in
/// `variants` (prefetch and loading) under `device_budget`, at every batch size, `rounds` times
/// alternating.
#[allow(clippy::too_many_arguments)]
pub fn ring_bench(
    checkpoint: &Path,
    cpu: &Cpu,
    device_budget: u64,
    io_threads: usize,
    variants: &[(Prefetch, RingLoad)],
    batches: &[usize],
    tokens: usize,
    rounds: usize,
) -> Result<RingReport> {
    let probe = ModelFile::open(checkpoint)?;
    let checkpoint_bytes = probe.bytes();
    drop(probe);
    // The resident variant holds the whole model, and its decoder a copy: refused up front where
    // that cannot fit (the allocation would abort the process), which is what the ring is for.
    super::check_memory(
        "the bench's resident variant (the whole model, and its decoder's copy)",
        2.0 * checkpoint_bytes as f64,
    )?;
    let mut rows: Vec<RingRow> = Vec::new();
    let mut geometry = (0, 0);
    for &batch in batches {
        let mut resident_rounds = Vec::new();
        let mut ring_rounds: Vec<Vec<RoundFigures>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds.max(1) {
            {
                let dir = ModelFile::open(checkpoint)?.dir().to_path_buf();
                // The weights alone: the optimizer state is not needed to generate.
                let model = crate::train::trainer::model_from(crate::storage::checkpoint::load_model_only(&dir)?)?;
                let mut decoder = BatchDecoder::new(&model, cpu.clone(), batch)?;
                run(&mut decoder, batch, WARM_UP_TOKENS, warm_up_seeds(round))?;
                let seconds = run(&mut decoder, batch, tokens, timed_seeds(round))?;
                resident_rounds.push((batch * tokens) as f64 / seconds);
            }
            for (i, &(p, load)) in variants.iter().enumerate() {
                let ring = RingWeights::new(
                    ModelFile::open(checkpoint)?,
                    &RingOptions {
                        device_budget,
                        host_budget: 0,
                        prefetch: p,
                        io_threads,
                        load,
                        batch,
                    },
                )?;
                let mut decoder = BatchDecoder::with_source(ring, cpu.clone(), batch)?;
                run(&mut decoder, batch, WARM_UP_TOKENS, warm_up_seeds(round))?;
                let before = decoder.source().stats();
                let seconds = run(&mut decoder, batch, tokens, timed_seeds(round))?;
                let after = decoder.source().stats();
                geometry = (after.sections, after.section_bytes);
                let passes = (after.passes - before.passes).max(1) as f64;
                let loaded =
                    (after.bytes_read + after.bytes_from_host - before.bytes_read - before.bytes_from_host) as f64;
                // Of the timed tokens only (the warm-up's guesses, made while the routing is
                // learnt, are not the figure).
                let hits = (after.predicted_hits - before.predicted_hits) as f64;
                let guesses = hits + (after.predicted_misses - before.predicted_misses) as f64;
                ring_rounds[i].push((
                    (batch * tokens) as f64 / seconds,
                    (after.stall_seconds - before.stall_seconds) * 1e3 / (batch * tokens) as f64,
                    loaded / passes,
                    (guesses > 0.0).then(|| hits / guesses),
                ));
            }
        }
        rows.push(RingRow {
            variant: "resident".into(),
            batch,
            tokens_per_s: median(resident_rounds.clone()),
            stall_per_token_ms: 0.0,
            loaded_per_pass: 0.0,
            guess_accuracy: None,
            rounds: resident_rounds,
        });
        for (i, &(p, load)) in variants.iter().enumerate() {
            let r = &ring_rounds[i];
            let tps: Vec<f64> = r.iter().map(|x| x.0).collect();
            let accuracy: Vec<f64> = r.iter().filter_map(|x| x.3).collect();
            rows.push(RingRow {
                variant: variant_name(p, load),
                batch,
                tokens_per_s: median(tps.clone()),
                stall_per_token_ms: median(r.iter().map(|x| x.1).collect()),
                loaded_per_pass: median(r.iter().map(|x| x.2).collect()),
                guess_accuracy: (!accuracy.is_empty()).then(|| median(accuracy)),
                rounds: tps,
            });
        }
    }
    Ok(RingReport {
        checkpoint_bytes,
        device_budget,
        sections: geometry.0,
        section_bytes: geometry.1,
        threads: cpu.threads(),
        tokens,
        rows,
    })
}

/// The row name of a ring variant: "ring, routed, map".
pub fn variant_name(prefetch: Prefetch, load: RingLoad) -> String {
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    };
    format!(
        "ring, {}, {}",
        name(serde_json::to_value(prefetch)),
        name(serde_json::to_value(load))
    )
}
