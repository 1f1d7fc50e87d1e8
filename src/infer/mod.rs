//! Inference: sampling text from a trained model.

pub mod generate;

pub use generate::{generate, SampleOptions};
