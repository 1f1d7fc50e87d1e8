//! The parameters of an MoE layer: one flat buffer per parameter group (llm.c style), which is what
//! tiers move, checkpoints store and communicators send. Gradients use the same struct.

use super::stages::ExpertWeights;
use super::MoeConfig;
use crate::error::{Error, Result};
use crate::kernels::Scalar;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Parameters (or gradients) of one MoE layer, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeParams<T> {
    /// Gate weights `[d_model][E]` (no bias).
    pub wg: Vec<T>,
    /// First expert matrices `[E][d_model][d_ff]`.
    pub w1: Vec<T>,
    /// First expert biases `[E][d_ff]`.
    pub b1: Vec<T>,
    /// Second expert matrices `[E][d_ff][d_model]`.
    pub w2: Vec<T>,
    /// Second expert biases `[E][d_model]`.
    pub b2: Vec<T>,
}

impl<T: Scalar> MoeParams<T> {
    /// All zeros (the starting point of gradient accumulation).
    pub fn zeros(c: &MoeConfig) -> Self {
        let (d, f, e) = (c.d_model, c.d_ff, c.experts);
        MoeParams {
            wg: vec![T::ZERO; d * e],
            w1: vec![T::ZERO; e * d * f],
            b1: vec![T::ZERO; e * f],
            w2: vec![T::ZERO; e * f * d],
            b2: vec![T::ZERO; e * d],
        }
    }

    /// Random initialisation from `seed`: matrices ~ N(0, 1/fan_in), biases zero. Deterministic
    /// (ChaCha8) on every platform.
    pub fn init(c: &MoeConfig, seed: u64) -> Result<Self> {
        c.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut fill = |n: usize, fan_in: usize| -> Result<Vec<T>> {
            let dist = Normal::new(0.0, 1.0 / (fan_in as f64).sqrt())
                .map_err(|e| Error::config(format!("cannot build the initialiser: {e}")))?;
            Ok((0..n).map(|_| T::from_f64(dist.sample(&mut rng))).collect())
        };
        let (d, f, e) = (c.d_model, c.d_ff, c.experts);
        Ok(MoeParams {
            wg: fill(d * e, d)?,
            w1: fill(e * d * f, d)?,
            b1: vec![T::ZERO; e * f],
            w2: fill(e * f * d, f)?,
            b2: vec![T::ZERO; e * d],
        })
    }

    /// Check every buffer's length against the config.
    pub fn check(&self, c: &MoeConfig) -> Result<()> {
        let (d, f, e) = (c.d_model, c.d_ff, c.experts);
        for (name, buf, want) in [
            ("wg", &self.wg, d * e),
            ("w1", &self.w1, e * d * f),
            ("b1", &self.b1, e * f),
            ("w2", &self.w2, e * f * d),
            ("b2", &self.b2, e * d),
        ] {
            if buf.len() != want {
                return Err(Error::shape(
                    format!("MoE parameter {name}"),
                    format!(
                        "expected {want} elements for d_model={d}, d_ff={f}, E={e}, got {}",
                        buf.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Expert `e`'s weights (slices of the layer buffers).
    pub fn expert(&self, c: &MoeConfig, e: usize) -> ExpertWeights<'_, T> {
        let (d, f) = (c.d_model, c.d_ff);
        ExpertWeights {
            w1: &self.w1[e * d * f..(e + 1) * d * f],
            b1: &self.b1[e * f..(e + 1) * f],
            w2: &self.w2[e * f * d..(e + 1) * f * d],
            b2: &self.b2[e * d..(e + 1) * d],
        }
    }

    /// The buffers with their names, in a fixed order.
    pub fn named(&self) -> [(&'static str, &Vec<T>); 5] {
        [
            ("wg", &self.wg),
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
        ]
    }

    /// The buffers with their names, mutable, in the same order as [`MoeParams::named`].
    pub fn named_mut(&mut self) -> [(&'static str, &mut Vec<T>); 5] {
        [
            ("wg", &mut self.wg),
            ("w1", &mut self.w1),
            ("b1", &mut self.b1),
            ("w2", &mut self.w2),
            ("b2", &mut self.b2),
        ]
    }
}
