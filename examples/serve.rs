//! The completion service embedded in your own tokio program: a model (a checkpoint given as the
//! first argument, or a tiny untrained one built in code), a server on a port of your choice, and
//! a graceful shutdown on Ctrl-C.
//!
//! ```text
//! cargo run --release --example serve                         # an untrained model, on 127.0.0.1:8080
//! cargo run --release --example serve -- runs/run-<time> 127.0.0.1:9090
//! curl -N localhost:8080/v1/completions -d '{"prompt": "HAMLET.\n", "max_tokens": 200, "stream": true}'
//! ```

use semoe::model::gpt::{Gpt, GptConfig};
use semoe::serve::{ServeConfig, Server};

#[tokio::main]
async fn main() -> semoe::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = match args.next() {
        Some(dir) => semoe::train::trainer::model_from(checkpoint(std::path::Path::new(&dir))?)?,
        None => {
            let config = GptConfig {
                block_size: 32,
                d_model: 64,
                n_layer: 2,
                n_head: 4,
                d_ff: 128,
                experts: 4,
                k: 2,
                ..GptConfig::default()
            };
            Gpt::init(&config, 1)?
        }
    };
    let config = ServeConfig {
        addr: args.next().unwrap_or_else(|| "127.0.0.1:8080".into()),
        max_batch: 4,
        ..ServeConfig::default()
    };
    // Your program's own metrics recorder could be passed here instead.
    let metrics = semoe::telemetry::metrics::install()?;
    semoe::telemetry::metrics::register_serve();
    let server = Server::bind(&model, config)?.with_metrics(metrics);
    println!("listening on http://{} (Ctrl-C stops)", server.local_addr());
    server
        .run(async {
            // If Ctrl-C cannot be caught, serve until the process is killed.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            println!("Ctrl-C: shutting down (a second Ctrl-C exits at once)");
            // Tokio keeps its handler installed after the first signal: without this a second
            // Ctrl-C would be swallowed until the requests in flight end or the grace runs out.
            tokio::spawn(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
        })
        .await?;
    println!("stopped");
    Ok(())
}

/// `path` itself if it is a checkpoint, else the newest intact checkpoint of the run directory `path`.
fn checkpoint(path: &std::path::Path) -> semoe::Result<semoe::storage::checkpoint::Checkpoint> {
    use semoe::storage::checkpoint;
    if path.join(checkpoint::MANIFEST_FILE).exists() {
        return checkpoint::load(path);
    }
    checkpoint::newest_intact(path)?.checkpoint.ok_or_else(|| {
        semoe::Error::config(format!(
            "{} is neither a checkpoint nor a run directory with an intact one",
            path.display()
        ))
    })
}
