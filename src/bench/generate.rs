//! Generation speed: the recomputing path (every byte runs its whole window through the model)
//! against the key/value-cached decoder, alone and in batches; bytes per second, median of rounds.
//!
//! Both start from a prompt as long as the model's context, so that every timed byte has a full
//! window (a short prompt's first bytes are cheap for the recomputing path, whose cost grows with
//! the window); the cached decoder's first step, which encodes the prompt, is outside its clock.

use super::median;
use crate::error::Result;
use crate::infer::{generate, generate_recomputing, BatchDecoder, SampleOptions};
use crate::kernels::Cpu;
use crate::model::gpt::Gpt;
use serde::Serialize;
use std::time::Instant;

/// One batch size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateRow {
    /// Sequences decoded together.
    pub batch: usize,
    /// Bytes per second over the whole batch (median of the rounds).
    pub bytes_per_s: f64,
    /// Every round's figure.
    pub rounds: Vec<f64>,
}

/// What `semoe bench generate` measured.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateReport {
    /// Compute threads.
    pub threads: usize,
    /// Bytes each sequence generates per round (cached decoder).
    pub tokens: usize,
    /// Bytes per round of the recomputing path.
    pub recompute_tokens: usize,
    /// The recomputing path, one sequence.
    pub recompute_bytes_per_s: f64,
    /// The cached decoder per batch size.
    pub cached: Vec<GenerateRow>,
}

fn opts(tokens: usize, seed: u64) -> SampleOptions {
    SampleOptions {
        max_tokens: tokens,
        temperature: 0.8,
        top_k: 40,
        seed,
    }
}

/// Measure generation from `model`: `rounds` rounds, each timing the recomputing path for
/// `recompute_tokens` bytes and the cached decoder for `tokens` bytes per sequence at every batch
/// size in `batches`, alternating so that a noisy neighbour slows every variant alike.
pub fn generate_bench(
    model: &Gpt<f32>,
    cpu: &Cpu,
    tokens: usize,
    recompute_tokens: usize,
    batches: &[usize],
    rounds: usize,
) -> Result<GenerateReport> {
    // A full window from the first timed byte on.
    let prompt: Vec<u8> = b"ROMEO.\n"
        .iter()
        .cycle()
        .take(model.config().block_size)
        .copied()
        .collect();
    let prompt = &prompt[..];
    let mut recompute = Vec::new();
    let mut cached: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
    // Warm up once (page faults, caches).
    generate(model, cpu, prompt, &opts(64, 0), |_| Ok(()))?;
    // The recomputing path's dropless copy of the model, made outside its clock (the cached
    // decoder makes its own before its clock starts too).
    let inference = model.for_inference()?;
    for round in 0..rounds.max(1) {
        let t = Instant::now();
        generate_recomputing(&inference, cpu, prompt, &opts(recompute_tokens, round as u64))?;
        recompute.push(recompute_tokens as f64 / t.elapsed().as_secs_f64());
        for (i, &batch) in batches.iter().enumerate() {
            let mut decoder = BatchDecoder::new(model, cpu.clone(), batch)?;
            // One byte more, for the step that encodes the prompt (outside the clock).
            for s in 0..batch {
                decoder.admit(prompt, &opts(tokens + 1, (round * 1000 + s) as u64))?;
            }
            decoder.step()?;
            let t = Instant::now();
            let mut bytes = 0usize;
            while decoder.active() > 0 {
                bytes += decoder.step()?.len();
            }
            cached[i].push(bytes as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(GenerateReport {
        threads: cpu.threads(),
        tokens,
        recompute_tokens,
        recompute_bytes_per_s: median(recompute.clone()),
        cached: batches
            .iter()
            .zip(cached)
            .map(|(&batch, rounds)| GenerateRow {
                batch,
                bytes_per_s: median(rounds.clone()),
                rounds,
            })
            .collect(),
    })
}
