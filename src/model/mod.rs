//! Model code: layers with explicit forward and backward passes (no autograd), in the style of llm.c.

pub mod cuda;
pub mod gpt;
pub mod layers;
pub mod legs;
pub mod moe;
pub mod pass;
