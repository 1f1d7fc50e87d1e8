//! Inference: sampling text from a trained model, one sequence or a batch.

pub mod batch;
pub mod generate;

pub use batch::{BatchDecoder, Emitted, SeqId};
pub use generate::{generate, SampleOptions};
