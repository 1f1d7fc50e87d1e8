//! Training: the corpus, the deterministic sampler, the AdamW optimizer with its schedule, and the
//! training loop with evaluation, checkpoints and metrics; [`log`] is the metrics log's schema.

pub mod calibrate;
pub mod chaos;
pub mod chaos_processes;
pub mod engine;
pub mod log;
pub mod trainer;

// The configuration, the data and the optimizer live below the actor runtime (which uses them) and
// are re-exported here under the paths they had when they were part of `train`.
pub use crate::config;
pub use crate::config::memory;
pub use crate::data::{corpus as data, sampler};
pub use crate::optimizer;

pub use config::{TrainConfig, TrainSettings};
pub use data::Corpus;
pub use optimizer::{AdamW, OptimizerConfig};
pub use trainer::{RunSummary, Trainer};
