//! semoe: an elastic Mixture-of-Experts training and inference runtime.
//!
//! Today it runs in one process: the actor runtime with in-process workers, expert state in
//! Device/Host/Disk tiers, checkpoints, and bitwise determinism across worker counts, placements
//! and resume. Multi-process elastic training, ring-memory inference and the GPU path are not built
//! yet.
//!
//! The crate is organised as `docs/architecture.md` describes (module map, layering, the path of a
//! token batch, the determinism contract): [`kernels`] (compute backends), [`model`] (layers
//! with hand-written forward and backward passes), [`train`] (data, sampler, optimizer, the training
//! loop), [`actors`] (the supervised actor runtime: coordinator, workers, gates, experts, tiers,
//! communicators), [`net`] (transports), [`chaos`] (fault injection), [`storage`] (checkpoints,
//! run directories, expert tiers), [`telemetry`] (metrics and reports), [`infer`] (generation) and
//! [`bench`] (the measurements behind `semoe bench`).
//!
//! # Embedding the runtime
//!
//! Build a runtime from code, train, read the state, checkpoint, shut down (inside any tokio
//! runtime; `examples/embed.rs` is the same as a complete program):
//!
//! ```no_run
//! use semoe::actors::{ExpertPlacement, Runtime};
//! use semoe::train::TrainConfig;
//!
//! # async fn run() -> semoe::Result<()> {
//! let mut config = TrainConfig::default();
//! config.model.d_model = 64;
//! config.train.steps = 100;
//! let runtime = Runtime::builder(config)
//!     .workers(2)
//!     .placement(ExpertPlacement::RoundRobin)
//!     .text("To be, or not to be, that is the question.\n".repeat(100))
//!     .build()
//!     .await?;
//! for _ in 0..100 {
//!     let step = runtime.step().await?;
//!     println!("step {}: gradient norm {:.3}", step.step, step.grad_norm);
//! }
//! let checkpoint = runtime.save_checkpoint(std::path::Path::new("runs/embedded")).await?;
//! println!("saved {}", checkpoint.display());
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod actors;
pub mod bench;
pub mod chaos;
pub mod config;
pub mod data;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod net;
pub mod optimizer;
pub mod storage;
pub mod telemetry;
pub mod train;

pub use error::{Error, Result};
