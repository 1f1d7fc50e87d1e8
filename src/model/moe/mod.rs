//! The Mixture-of-Experts feed-forward layer.
//!
//! A gate scores every token against every expert (`logits = x @ wg`, softmax), each token picks its
//! top-k experts, each expert takes at most `capacity` tokens, and the token's output is the weighted
//! sum of its kept experts' outputs. Dispatch and combine are index gathers; nothing builds a dense
//! one-hot tensor. See [`MoeConfig`] for every option and [`MoeLayer`] for the passes.
//!
//! ```
//! use semoe::kernels::Cpu;
//! use semoe::model::moe::{MoeConfig, MoeLayer, MoeParams};
//!
//! let config = MoeConfig { d_model: 16, d_ff: 32, experts: 4, k: 2, ..MoeConfig::default() };
//! let layer = MoeLayer::new(config.clone(), MoeParams::<f32>::init(&config, 7)?)?;
//! let cpu = Cpu::new(1)?;
//! let x = vec![0.5f32; 10 * 16]; // 10 tokens
//! let (out, cache) = layer.forward(&cpu, &x)?;
//! assert_eq!(out.y.len(), x.len());
//! let mut grads = MoeParams::zeros(&config);
//! let grad_x = layer.backward(&cpu, &x, cache, &out.y, &mut grads)?;
//! assert_eq!(grad_x.len(), x.len());
//! # Ok::<(), semoe::Error>(())
//! ```

mod config;
mod layer;
mod params;
mod routing;
pub mod stages;

pub use config::{DropPolicy, MoeConfig};
pub use layer::{MoeCache, MoeLayer, MoeOutput, MoeStats};
pub use params::MoeParams;
pub use routing::Routing;
