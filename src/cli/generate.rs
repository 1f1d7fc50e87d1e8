//! `semoe generate`: stream a sample from a checkpoint to standard output.

use clap::Args;
use semoe::infer::{generate, SampleOptions};
use semoe::kernels::Cpu;
use semoe::storage::checkpoint;
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

pub fn stream_sample(
    model: &semoe::model::gpt::Gpt<f32>,
    prompt: &str,
    opts: &SampleOptions,
    threads: usize,
) -> semoe::Result<()> {
    let cpu = Cpu::new(threads)?;
    let mut out = std::io::stdout().lock();
    if !write_out(&mut out, prompt.as_bytes())? {
        return Ok(());
    }
    let result = generate(model, &cpu, prompt.as_bytes(), opts, |b| {
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
/// with a warning for each newer one that is damaged.
pub fn checkpoint_to_read(path: &Path) -> semoe::Result<checkpoint::Checkpoint> {
    if path.join(checkpoint::MANIFEST_FILE).exists() {
        return checkpoint::load(path);
    }
    let resolved = checkpoint::newest_intact(path)?;
    for d in &resolved.damaged {
        eprintln!(
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

pub fn run(a: &GenerateArgs) -> semoe::Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(semoe::Error::config(format!(
            "--temperature must be a non-negative number (0: always the most likely byte), got {}",
            a.temperature
        )));
    }
    let prompt = unescape(&a.prompt)?;
    let ckpt = checkpoint_to_read(&a.checkpoint)?;
    let model = semoe::train::trainer::model_from(ckpt)?;
    let opts = SampleOptions {
        max_tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    stream_sample(&model, &prompt, &opts, a.threads)
}
