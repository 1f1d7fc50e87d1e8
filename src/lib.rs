//! semoe: an elastic Mixture-of-Experts training and inference runtime.
//!
//! The actor runtime with in-process workers or worker processes that join and leave (elastic),
//! expert state in Device/Host/Disk tiers, checkpoints, bitwise determinism across worker counts,
//! placements, membership changes and resume; incremental, batched and ring-memory generation. The
//! GPU path (one-GPU training, the expert exchange over NCCL; feature `cuda`) is built but has not
//! yet run on a GPU.
//!
//! The crate is organised as `docs/architecture.md` describes (module map, layering, the path of a
//! token batch, the determinism contract), lowest layer first: [`kernels`] (compute backends),
//! [`model`] (layers with hand-written forward and backward passes), [`optimizer`] (AdamW and its
//! schedule), [`storage`] (checkpoints, run directories, the tiered expert store), [`config`] and
//! [`data`] (the job's configuration, corpus and sampler), [`net`] (transports), [`chaos`] (fault
//! injection: plans, seeded scenarios, network faults), [`actors`] (the supervised actor runtime:
//! coordinator, workers, gates, experts, tiers, communicators), [`train`] (the training loop and
//! chaos runs), [`telemetry`] (metrics and reports),
//! [`infer`] (generation: the cached decoder, batching, the ring), [`serve`] (the HTTP completion
//! service) and [`bench`](mod@bench) (the measurements behind `semoe bench`).
//! `docs/runtime-semantics.md` is the runtime's protocol.
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
// Every public item says what it is for; every unsafe operation sits in its own `unsafe` block,
// even inside an `unsafe fn`, with a `// SAFETY:` comment stating the invariant that makes it sound.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod actors;
pub mod bench;
pub mod chaos;
pub mod config;
pub mod console;
pub mod data;
pub mod elastic;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod net;
pub mod optimizer;
pub mod serve;
pub mod storage;
pub mod telemetry;
pub mod train;

pub use error::{Error, Result};

/// The README's Rust code blocks, compiled and run as doc-tests (`cargo test --doc`) so that the
/// snippet there keeps building against the API; only rustdoc's doc-test pass sees this item.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
