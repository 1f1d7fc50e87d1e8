//! Parameter storage: checkpoints (safetensors plus a manifest).
