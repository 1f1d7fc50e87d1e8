//! Training: the corpus, the deterministic sampler, the AdamW optimizer with its schedule, and the
//! training loop with evaluation, checkpoints and metrics.

pub mod calibrate;
pub mod config;
pub mod data;
pub mod memory;
pub mod optimizer;
pub mod sampler;
pub mod trainer;

pub use config::{TrainConfig, TrainSettings};
pub use data::Corpus;
pub use optimizer::{AdamW, OptimizerConfig};
pub use trainer::{RunSummary, Trainer};
