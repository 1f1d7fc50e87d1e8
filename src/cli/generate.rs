//! `semoe generate`: stream a sample from a checkpoint to standard output.

use clap::Args;
use semoe::infer::weights::WeightSource;
use semoe::infer::{generate_with, BatchDecoder, ModelFile, Prefetch, RingOptions, RingWeights, SampleOptions};
use semoe::kernels::Cpu;
use semoe::storage::checkpoint;
use semoe::storage::tiers::{format_bytes, parse_bytes};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Options of `semoe generate`.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue (`\n` newline, `\t` tab, `\\` backslash).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 500)]
    tokens: usize,
    /// Softmax temperature (0: always the most likely byte).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely bytes (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Samples drawn together (seeds --seed, --seed + 1, ...): one pass over the weights serves
    /// the whole batch. With more than one, the samples print when all are done.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// The memory budgets of generation (the ring's and the key/value cache's), shared by `generate`
/// and `serve`.
#[derive(Args)]
pub struct MemoryArgs {
    /// The most bytes of key/value cache (one slot per sequence of the batch, allocated at start);
    /// a batch that needs more is refused, naming how many sequences fit.
    #[arg(long)]
    kv_budget: Option<String>,
    /// Ring-memory inference: stream the weights from the checkpoint through a ring of sections
    /// within this many bytes (e.g. 64MiB) instead of loading the whole model (docs/inference.md).
    #[arg(long)]
    device_budget: Option<String>,
    /// With --device-budget: bytes of pieces kept in memory (the Host tier) instead of read from
    /// the checkpoint file at every pass.
    #[arg(long, default_value = "0")]
    host_budget: String,
    /// With --device-budget: what the ring loads ahead: routed (experts by the predicted, then
    /// the real routing), whole-block (every expert), on-demand (nothing ahead).
    #[arg(long, default_value = "routed")]
    prefetch: String,
    /// With --device-budget: threads reading the checkpoint.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// With --device-budget: how pieces get into the ring's sections: map (each piece's pages of
    /// the checkpoint file mapped into its section and read in place), copy (each piece read into
    /// a section's own buffer), or auto (copy for batches of 8 or more; below, map for pieces of
    /// 1 MiB and more, else copy).
    #[arg(long, default_value = "auto")]
    ring_load: String,
}

impl MemoryArgs {
    /// Refuse a batch of `batch` sequences of a model of `config` whose key/value cache exceeds
    /// --kv-budget, or without one the memory available now (checked before anything is
    /// allocated: an absurd batch would abort the process).
    pub fn check_cache(&self, config: &semoe::model::gpt::GptConfig, batch: usize) -> semoe::Result<()> {
        let (budget, what) = match &self.kv_budget {
            Some(budget) => (parse_bytes("--kv-budget", budget)?, "--kv-budget"),
            None => match semoe::config::memory::available_bytes() {
                Some(available) => (available, "the memory available"),
                None => return Ok(()),
            },
        };
        let slot = semoe::infer::decoder::KvCache::slot_bytes(config);
        let need = slot.saturating_mul(batch as u64);
        if need > budget {
            return Err(semoe::Error::config(format!(
                "{what} ({}) holds the key/value cache of {} sequence(s) ({} each); a batch of {batch} needs {}",
                format_bytes(budget),
                budget / slot.max(1),
                format_bytes(slot),
                format_bytes(need)
            )));
        }
        Ok(())
    }

    /// The ring's options for batches of at most `batch` sequences, or `None` without
    /// --device-budget (the whole model in memory).
    pub fn options(&self, batch: usize) -> semoe::Result<Option<RingOptions>> {
        let Some(budget) = &self.device_budget else {
            // The ring's own options would be ignored: say so.
            let given = [
                (parse_bytes("--host-budget", &self.host_budget)? != 0, "--host-budget"),
                (self.prefetch != "routed", "--prefetch"),
                (self.io_threads != 1, "--io-threads"),
                (self.ring_load != "auto", "--ring-load"),
            ];
            if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
                return Err(semoe::Error::config(format!(
                    "{flag} sets up ring-memory inference, which --device-budget SIZE turns on; without it the \
                     whole model is loaded"
                )));
            }
            return Ok(None);
        };
        Ok(Some(RingOptions {
            device_budget: parse_bytes("--device-budget", budget)?,
            host_budget: parse_bytes("--host-budget", &self.host_budget)?,
            prefetch: self.prefetch.parse::<Prefetch>()?,
            io_threads: self.io_threads,
            load: self.ring_load.parse()?,
            batch,
        }))
    }
}

/// A prompt as typed on a command line, with `\n` (newline), `\t` (tab), `\r` and `\\`
/// (backslash) understood; any other escape is an error naming it.
pub fn unescape(s: &str) -> semoe::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                return Err(semoe::Error::config(format!(
                    "the prompt has an unknown escape \\{other} (known: \\n, \\t, \\r, \\\\)"
                )))
            }
            None => {
                return Err(semoe::Error::config(
                    "the prompt ends with a lone backslash (write \\\\ for one)",
                ))
            }
        }
    }
    Ok(out)
}

/// Write to standard output; a closed pipe (`semoe generate | head`) ends the output quietly.
pub fn write_out(out: &mut impl Write, bytes: &[u8]) -> semoe::Result<bool> {
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(semoe::Error::io("cannot write the sample", "stdout", e)),
    }
}

/// A sentinel error that stops generation when the reader of standard output has gone.
pub const READER_GONE: &str = "standard output was closed";

/// Print `prompt` and the bytes `decoder` draws after it as they come (an idle decoder; see
/// [`semoe::infer::generate_with`]).
pub fn stream_sample<S: semoe::infer::weights::WeightSource>(
    decoder: &mut BatchDecoder<S>,
    prompt: &str,
    opts: &SampleOptions,
) -> semoe::Result<()> {
    let mut out = std::io::stdout().lock();
    if !write_out(&mut out, prompt.as_bytes())? {
        return Ok(());
    }
    let result = generate_with(decoder, prompt.as_bytes(), opts, |b| {
        if write_out(&mut out, &[b])? {
            Ok(())
        } else {
            Err(semoe::Error::runtime(READER_GONE))
        }
    });
    match result {
        Ok(_) => write_out(&mut out, b"\n").map(|_| ()),
        Err(semoe::Error::Runtime(msg)) if msg == READER_GONE => Ok(()),
        Err(e) => Err(e),
    }
}

/// The checkpoint to read for `generate` and `eval`: `path` itself if it is a checkpoint
/// directory (which must verify), else the newest intact checkpoint of the run directory `path`,
/// with a warning for each newer one that is damaged. Its model only: the optimizer state (twice
/// the model) is neither read nor verified.
pub fn checkpoint_to_read(path: &Path) -> semoe::Result<checkpoint::Checkpoint> {
    if path.join(checkpoint::MANIFEST_FILE).exists() {
        return checkpoint::load_model_only(path);
    }
    let resolved = checkpoint::newest_intact_model(path)?;
    for d in &resolved.damaged {
        semoe::say!(
            "warning: checkpoint {} is damaged ({}); using an older one",
            d.dir.display(),
            d.reason
        );
    }
    resolved.checkpoint.ok_or_else(|| {
        semoe::Error::config(format!(
            "{} is neither a checkpoint nor a run directory with an intact one",
            path.display()
        ))
    })
}

/// The most bytes of samples a batch of several holds (they print when all are done; one sample
/// streams and holds none).
const MAX_HELD_SAMPLE_BYTES: usize = 1 << 30;

pub fn run(a: &GenerateArgs) -> semoe::Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(semoe::Error::config(format!(
            "--temperature must be a non-negative number (0: always the most likely byte), got {}",
            a.temperature
        )));
    }
    if a.batch == 0 {
        return Err(semoe::Error::config("--batch must be at least 1"));
    }
    let held = a.batch.saturating_mul(a.tokens);
    if a.batch > 1 && held > MAX_HELD_SAMPLE_BYTES {
        return Err(semoe::Error::config(format!(
            "--batch {} with --tokens {} holds {} of samples until all are done (at most {}): generate fewer \
             tokens, or use --batch 1, which prints its sample as it goes",
            a.batch,
            a.tokens,
            format_bytes(held as u64),
            format_bytes(MAX_HELD_SAMPLE_BYTES as u64)
        )));
    }
    let prompt = unescape(&a.prompt)?;
    let opts = SampleOptions {
        max_tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let cpu = Cpu::new(a.threads)?;
    match a.memory.options(a.batch)? {
        None => {
            let ckpt = checkpoint_to_read(&a.checkpoint)?;
            let model = semoe::train::trainer::model_from(ckpt)?;
            a.memory.check_cache(model.config(), a.batch)?;
            // The decoder owns the model: one copy of it in memory.
            let mut decoder = BatchDecoder::from_model(model, cpu, a.batch)?;
            if a.batch == 1 {
                return stream_sample(&mut decoder, &prompt, &opts);
            }
            let (bytes, seconds) = sample_batch(&mut decoder, &prompt, &opts, a.batch)?;
            semoe::say!(
                "{bytes} bytes in {seconds:.2} s: {:.0} bytes/s",
                bytes as f64 / seconds.max(1e-9)
            );
            Ok(())
        }
        Some(options) => {
            let file = ModelFile::open(&a.checkpoint)?;
            a.memory.check_cache(file.config(), a.batch)?;
            let checkpoint_bytes = file.bytes();
            let ring = RingWeights::new(file, &options)?;
            let mut decoder = BatchDecoder::with_source(ring, cpu, a.batch)?;
            let cache = decoder.cache_bytes();
            let (bytes, seconds) = if a.batch == 1 {
                stream_from(&mut decoder, &prompt, &opts)?
            } else {
                sample_batch(&mut decoder, &prompt, &opts, a.batch)?
            };
            let stats = decoder.source().stats();
            semoe::say!(
                "ring: checkpoint {} in {} sections of {} ({} on the Device side with {} resident; Host tier {}), \
                 key/value cache {}; pieces {}",
                format_bytes(checkpoint_bytes),
                stats.sections,
                format_bytes(stats.section_bytes),
                format_bytes(stats.device_bytes),
                format_bytes(stats.resident_bytes),
                format_bytes(stats.host_bytes),
                format_bytes(cache),
                match stats.load {
                    semoe::infer::RingLoad::Map => "mapped (large parts read in place)",
                    semoe::infer::RingLoad::Copy | semoe::infer::RingLoad::Auto => "copied into the sections",
                }
            );
            semoe::say!(
                "ring: {bytes} bytes in {seconds:.2} s = {:.0} tokens/s; stalled on loads {:.2} s; read {} from the \
                 checkpoint file ({} of it mapped), {} from the Host tier; {} passes; {} pieces read again where they were kept; \
                 routing guessed right {} / wrong {}",
                bytes as f64 / seconds.max(1e-9),
                stats.stall_seconds,
                format_bytes(stats.bytes_read),
                format_bytes(stats.bytes_mapped),
                format_bytes(stats.bytes_from_host),
                stats.passes,
                stats.kept_hits,
                stats.predicted_hits,
                stats.predicted_misses
            );
            if let Some(peak) = peak_rss() {
                semoe::say!(
                    "ring: peak resident memory {peak} bytes ({}; budgets: Device {}, Host {}, key/value cache {})",
                    format_bytes(peak),
                    format_bytes(options.device_budget),
                    format_bytes(options.host_budget),
                    format_bytes(cache)
                );
            }
            Ok(())
        }
    }
}

/// Stream one sample from `decoder` to standard output; returns (bytes, seconds).
fn stream_from<S: WeightSource>(
    decoder: &mut BatchDecoder<S>,
    prompt: &str,
    opts: &SampleOptions,
) -> semoe::Result<(usize, f64)> {
    let mut out = std::io::stdout().lock();
    if !write_out(&mut out, prompt.as_bytes())? {
        return Ok((0, 0.0));
    }
    if opts.max_tokens == 0 {
        // As the resident path ends it: the prompt on a line of its own.
        write_out(&mut out, b"\n")?;
        return Ok((0, 0.0));
    }
    decoder.admit(prompt.as_bytes(), opts)?;
    let started = std::time::Instant::now();
    let mut bytes = 0;
    while decoder.active() > 0 {
        for e in decoder.step()? {
            bytes += 1;
            if !write_out(&mut out, &[e.byte])? {
                return Ok((bytes, started.elapsed().as_secs_f64()));
            }
        }
    }
    write_out(&mut out, b"\n")?;
    Ok((bytes, started.elapsed().as_secs_f64()))
}

/// Draw `batch` samples together (seeds `opts.seed + i`) and print them one after another;
/// returns (bytes, seconds).
fn sample_batch<S: WeightSource>(
    decoder: &mut BatchDecoder<S>,
    prompt: &str,
    opts: &SampleOptions,
    batch: usize,
) -> semoe::Result<(usize, f64)> {
    if opts.max_tokens == 0 {
        return Ok((0, 0.0));
    }
    let mut ids = Vec::with_capacity(batch);
    for i in 0..batch {
        let o = SampleOptions {
            seed: opts.seed.wrapping_add(i as u64),
            ..opts.clone()
        };
        ids.push(decoder.admit(prompt.as_bytes(), &o)?);
    }
    let started = std::time::Instant::now();
    let mut samples: Vec<Vec<u8>> = vec![Vec::new(); batch];
    let mut bytes = 0;
    while decoder.active() > 0 {
        for e in decoder.step()? {
            if let Some(i) = ids.iter().position(|&id| id == e.id) {
                samples[i].push(e.byte);
                bytes += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    for (i, sample) in samples.iter().enumerate() {
        let header = format!(
            "--- sample {} (seed {}) ---\n{prompt}",
            i + 1,
            opts.seed.wrapping_add(i as u64)
        );
        if !write_out(&mut out, header.as_bytes())? || !write_out(&mut out, sample)? || !write_out(&mut out, b"\n")? {
            break;
        }
    }
    Ok((bytes, seconds))
}

/// The process's peak resident set (`VmHWM`), where the system reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
