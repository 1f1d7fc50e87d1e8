//! Parameter storage: checkpoints (safetensors plus a manifest).

pub mod checkpoint;

pub use checkpoint::{Checkpoint, LoadedTensor, NamedTensor};
