//! Parameter storage: checkpoints (safetensors plus a manifest) and the tiers expert state lives in
//! while training (Device, Host, Disk).

pub mod checkpoint;
pub mod run_dir;
pub mod scratch;
pub mod state;
pub mod text_file;
pub mod tiers;

pub use checkpoint::{Checkpoint, LoadedTensor, NamedTensor};
