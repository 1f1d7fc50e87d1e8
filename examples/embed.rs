//! Embedding the runtime in a tokio service: build it from code (no files), train a few steps on
//! your own text, read its metrics, write a checkpoint, and shut down cleanly.
//!
//! ```text
//! cargo run --release --example embed
//! ```

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use semoe::actors::{ExpertPlacement, Runtime};
use semoe::telemetry::metrics as names;
use semoe::train::TrainConfig;

#[tokio::main]
async fn main() -> semoe::Result<()> {
    // Record metrics in memory (a service would install its exporter here instead, before the
    // runtime starts, for example `semoe::telemetry::metrics::serve_prometheus("127.0.0.1:9000")`
    // on this tokio runtime; `serve_in_background` owns a runtime of its own, for programs
    // without one, and must not be dropped inside this one).
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .map_err(|e| semoe::Error::runtime(format!("cannot install the metrics recorder: {e}")))?;

    // A small model, configured in code.
    let mut config = TrainConfig::default();
    config.model.d_model = 64;
    config.model.n_layer = 2;
    config.model.n_head = 4;
    config.model.block_size = 32;
    config.model.d_ff = 128;
    config.model.experts = 4;
    config.train.batch = 8;
    config.train.groups = 4;
    config.train.steps = 20;
    config.optimizer.warmup = 5;

    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n\
                The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n"
        .repeat(50);
    let runtime = Runtime::builder(config.clone())
        .workers(2)
        .placement(ExpertPlacement::RoundRobin)
        .text(text)
        .build()
        .await?;
    println!("placement: experts on workers {:?}", runtime.placement().expert_owner);

    for _ in 0..config.train.steps {
        let s = runtime.step().await?;
        let ce: f64 =
            s.outputs.iter().map(|o| o.ce_sum).sum::<f64>() / (config.train.batch * config.model.block_size) as f64;
        if s.step % 5 == 0 {
            println!(
                "step {:>3}: loss {ce:.3}, grad norm {:.3}, {:.0} ms",
                s.step,
                s.grad_norm,
                s.seconds * 1e3
            );
        }
    }

    // Read the metrics the runtime recorded.
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name();
        if name == names::COMMITTED_STEP || name == names::ALLTOALL_BYTES || name == names::TOKENS_PER_SECOND {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let value = match value {
                DebugValue::Counter(n) => n.to_string(),
                DebugValue::Gauge(g) => format!("{:.1}", g.into_inner()),
                DebugValue::Histogram(h) => format!("{} samples", h.len()),
            };
            println!("metric {name}{{{}}} = {value}", labels.join(","));
        }
    }

    // Gather the model and optimizer from the workers and checkpoint them.
    let dir = std::env::temp_dir().join(format!("semoe-embed-{}", std::process::id()));
    let saved = runtime.save_checkpoint(&dir).await?;
    println!("checkpoint: {}", saved.display());
    let model = semoe::train::trainer::load_model(&saved)?;
    println!("reloaded: {} parameters", model.num_params());

    runtime.shutdown().await?;
    std::fs::remove_dir_all(&dir).map_err(|e| semoe::Error::io("cannot remove the example's directory", &dir, e))?;
    println!("shut down cleanly");
    Ok(())
}
