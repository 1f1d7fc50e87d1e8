//! AdamW (decoupled weight decay, bias correction) with a linear-warmup-then-cosine learning rate and
//! global-norm gradient clipping. The update follows `torch.optim.AdamW`'s single-tensor
//! implementation step for step, so PyTorch's numbers are reproduced to rounding.

use crate::error::{Error, Result};
use crate::kernels::{adamw_update, AdamwStep};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Optimizer hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    /// Steps of linear warmup.
    pub warmup: u64,
    /// Shape of the decay from `lr` to `min_lr`: `cosine` or `linear`.
    pub schedule: Schedule,
    /// Fraction of the steps after warmup over which the rate decays; before that it holds at `lr`
    /// (1: decay from the end of warmup; less: warmup-stable-decay).
    pub cooldown: f64,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2. Default 0.99: with small batches (2,048 tokens per step) a longer second-moment
    /// average ended 0.013-0.022 nats/byte lower than 0.95 (BENCHMARKS.md).
    pub beta2: f64,
    /// Adam epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (tensors of two or more dimensions).
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub clip: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 200,
            schedule: Schedule::Cosine,
            cooldown: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
        }
    }
}

impl OptimizerConfig {
    /// Why a step whose global gradient norm is `norm` must not be applied, if it must not: the
    /// norm is not finite, or the gradients (clipped to `clip` where clipping is on) are so large
    /// that the second moment, which sums their squares in float32, may overflow: an element at
    /// or past the square root of f32::MAX (about 1.8e19) would make it infinite for good, and
    /// every later update of that element 0, in silence. No element exceeds the (clipped) norm.
    /// Every caller reports it as divergence before any worker applies the step.
    pub fn divergence(&self, norm: f64) -> Option<String> {
        if !norm.is_finite() {
            return Some(format!("the gradient norm is {norm}"));
        }
        let largest = if self.clip > 0.0 { norm.min(self.clip) } else { norm };
        (largest >= (f32::MAX as f64).sqrt()).then(|| {
            format!(
                "the gradient norm is {norm:e} with optimizer.clip {}: its squares may overflow the optimizer's \
                 float32 second moment",
                self.clip
            )
        })
    }

    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !(ok(self.lr) && self.lr > 0.0) {
            return Err(Error::config(format!("optimizer.lr must be positive, got {}", self.lr)));
        }
        if !ok(self.min_lr) || self.min_lr > self.lr {
            return Err(Error::config(format!(
                "optimizer.min_lr must be in [0, lr], got {}",
                self.min_lr
            )));
        }
        if !(self.cooldown > 0.0 && self.cooldown <= 1.0) {
            return Err(Error::config(format!(
                "optimizer.cooldown must be in (0, 1], got {}",
                self.cooldown
            )));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(format!("optimizer.{name} must be in [0, 1), got {b}")));
            }
            // The update runs in f32: a beta that rounds to 1 there keeps its moment at 0 (beta1:
            // no update at all; beta2: steps of lr / eps).
            if b as f32 >= 1.0 {
                return Err(Error::config(format!(
                    "optimizer.{name} must be below 1 as a float32 (at most about 0.99999994), got {b}"
                )));
            }
        }
        // The first step moves by lr / (1 - beta1) in f32: infinite, it writes NaN (inf * 0)
        // into every parameter whose gradient is 0.
        if !((self.lr / (1.0 - self.beta1)) as f32).is_finite() {
            return Err(Error::config(format!(
                "optimizer.lr ({:e}) is too large: the first step, lr / (1 - beta1), overflows a float32",
                self.lr
            )));
        }
        // The update runs in f32: an eps that rounds to 0 there divides 0 by 0 for every
        // parameter whose gradient has been 0 so far.
        if !(ok(self.eps) && self.eps as f32 > 0.0 && (self.eps as f32).is_finite()) {
            return Err(Error::config(format!(
                "optimizer.eps must be a positive float32 (at least about 1.4e-45), got {}",
                self.eps
            )));
        }
        for (name, v) in [("weight_decay", self.weight_decay), ("clip", self.clip)] {
            if !ok(v) {
                return Err(Error::config(format!(
                    "optimizer.{name} must be a non-negative number, got {v}"
                )));
            }
        }
        // Decoupled decay multiplies the parameters by 1 - lr * weight_decay every step.
        if self.lr * self.weight_decay >= 1.0 {
            return Err(Error::config(format!(
                "optimizer.lr ({}) times optimizer.weight_decay ({}) must be below 1: each step multiplies the \
                 parameters by 1 - lr * weight_decay",
                self.lr, self.weight_decay
            )));
        }
        Ok(())
    }

    /// Learning rate of step `step` (0-based) in a run of `total` steps: linear warmup to `lr` over
    /// `warmup` steps, then `lr` until the last `cooldown` fraction of the remaining steps, which
    /// decay (cosine or linear) to `min_lr` at `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = total.saturating_sub(self.warmup).max(1) as f64;
        let decay_span = (span * self.cooldown).max(1.0);
        let decay_start = span - decay_span;
        let progress = (((step - self.warmup) as f64 - decay_start) / decay_span).clamp(0.0, 1.0);
        let remaining = match self.schedule {
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Linear => 1.0 - progress,
        };
        self.min_lr + (self.lr - self.min_lr) * remaining
    }
}

/// Shape of the learning-rate decay after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine from `lr` to `min_lr`.
    #[default]
    Cosine,
    /// A straight line from `lr` to `min_lr`.
    Linear,
}

/// AdamW state: first and second moments per parameter tensor, and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: OptimizerConfig,
    /// Steps taken.
    pub step: u64,
    /// First moments, one buffer per parameter tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Whether each tensor gets weight decay.
    decay: Vec<bool>,
}

/// The sum of squares of one buffer, in f64: eight interleaved partial sums (element `i` into sum
/// `i % 8`) added in a fixed tree at the end. The order depends on the buffer alone, so the result
/// does too; one chain of dependent f64 additions was a measurable share of a training step.
pub fn sum_squares(g: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = g.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += (v as f64) * (v as f64);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// The global gradient norm from the sums of squares of its parts, added in the order given.
///
/// The parts are the unit of ownership: a dense tensor is one part, an expert tensor one part per
/// expert. Whoever owns a part computes its sum; adding the sums in the canonical part order gives
/// the same norm however the parts are spread over workers.
pub fn norm_from_parts(parts: impl IntoIterator<Item = f64>) -> f64 {
    parts.into_iter().sum::<f64>().sqrt()
}

/// The norm of a set of gradient buffers, each one part (see [`norm_from_parts`]).
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    norm_from_parts(grads.iter().map(|g| sum_squares(g)))
}

impl AdamW {
    /// Fresh state for plain tensors of the given shapes; tensors of two or more dimensions get
    /// weight decay. Not for a model's tensors, whose stacks of per-expert biases are two-
    /// dimensional and not decayed: use [`for_model`] (or [`AdamW::with_decay`] with the
    /// flags of `GptConfig::tensor_specs`).
    pub fn new(config: OptimizerConfig, shapes: &[Vec<usize>]) -> Result<Self> {
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let decay: Vec<bool> = shapes.iter().map(|s| s.len() >= 2).collect();
        AdamW::with_decay(config, &sizes, &decay)
    }

    /// Fresh state for tensors of `sizes` elements, `decay[i]` saying whether tensor `i` gets weight
    /// decay (a model's matrices; not biases, norms, or a stack of per-expert biases).
    pub fn with_decay(config: OptimizerConfig, sizes: &[usize], decay: &[bool]) -> Result<Self> {
        config.validate()?;
        if sizes.len() != decay.len() {
            return Err(Error::shape("optimizer", "one decay flag per tensor is needed"));
        }
        Ok(AdamW {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            decay: decay.to_vec(),
        })
    }

    /// This optimizer's settings (hyper-parameters, which tensors decay) with no moments: the
    /// optimizer of a parameters-only copy, which refuses to step. Nothing of the moments is
    /// copied (a clone would copy twice the parameters' size, only to drop it).
    pub fn without_moments(&self) -> AdamW {
        AdamW {
            config: self.config.clone(),
            step: self.step,
            m: vec![Vec::new(); self.m.len()],
            v: vec![Vec::new(); self.v.len()],
            decay: self.decay.clone(),
        }
    }

    /// This optimizer's settings with `step` and the moments `m` and `v` (checked against this
    /// one's shapes, as [`AdamW::restore`] does), copying none of this one's moments.
    pub fn with_moments(&self, step: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> Result<AdamW> {
        self.check_moments(&m, &v)?;
        let mut o = self.without_moments();
        o.step = step;
        o.m = m;
        o.v = v;
        Ok(o)
    }

    /// Restore saved moments (from a checkpoint) after checking their sizes.
    pub fn restore(&mut self, step: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> Result<()> {
        self.check_moments(&m, &v)?;
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    fn check_moments(&self, m: &[Vec<f32>], v: &[Vec<f32>]) -> Result<()> {
        let same =
            |a: &[Vec<f32>], b: &[Vec<f32>]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len());
        if !same(m, &self.m) || !same(v, &self.v) {
            return Err(Error::shape(
                "optimizer state",
                "saved moments do not match the model's parameters",
            ));
        }
        Ok(())
    }

    /// Clip `grads` to the global norm `clip` (if set) and apply one AdamW step with learning rate
    /// `lr`, each tensor being one part of the norm. Returns the gradient norm before clipping.
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &mut [&mut Vec<f32>], lr: f64) -> Result<f64> {
        let norm = global_norm(&grads.iter().map(|g| g.as_slice()).collect::<Vec<_>>());
        self.apply(params, grads, lr, norm)?;
        Ok(norm)
    }

    /// One AdamW step given the global gradient norm (computed by the caller over every part of the
    /// model, possibly on other workers): clip by `clip / norm`, then update. The update is
    /// element-wise, so applying it tensor by tensor on different owners gives the same bits.
    pub fn apply(
        &mut self,
        params: &mut [&mut Vec<f32>],
        grads: &mut [&mut Vec<f32>],
        lr: f64,
        norm: f64,
    ) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::shape(
                "optimizer",
                "parameter and gradient lists differ from the optimizer state",
            ));
        }
        if params
            .iter()
            .zip(grads.iter())
            .zip(&self.m)
            .any(|((p, g), m)| p.len() != m.len() || g.len() != m.len())
        {
            return Err(Error::shape(
                "optimizer",
                "a parameter or gradient buffer has the wrong length",
            ));
        }
        let coef = self.clip_scale(norm)?;
        if coef < 1.0 {
            grads.iter_mut().for_each(|g| g.iter_mut().for_each(|v| *v *= coef));
        }
        let scalars = self.scalars(lr);
        self.step += 1;
        for (i, (p, g)) in params.iter_mut().zip(grads.iter()).enumerate() {
            let s = AdamwStep {
                keep: if self.decay[i] { scalars.keep } else { 1.0 },
                ..scalars
            };
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            // Element-wise, so splitting into chunks across threads changes nothing in the result.
            const CHUNK: usize = 16 * 1024;
            if rayon::current_thread_index().is_none() {
                // Outside a compute pool (a storage tier's I/O or manager thread applying a
                // deferred update): in place, on this thread. Handing the chunks to rayon's global
                // pool would wake (and keep spinning) threads the compute pool does not count,
                // competing with the step's compute on every unit loaded.
                let chunks = p.chunks_mut(CHUNK).zip(g.chunks(CHUNK));
                chunks
                    .zip(m.chunks_mut(CHUNK))
                    .zip(v.chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| adamw_update(p, g, m, v, s));
                continue;
            }
            let chunks = p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK));
            chunks
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| adamw_update(p, g, m, v, s));
        }
        Ok(())
    }
}

impl AdamW {
    /// The factor the gradients are multiplied by before the update, given their global norm:
    /// `clip / (norm + 1e-6)` when that is below 1 and clipping is on, else 1. A norm that
    /// [`OptimizerConfig::divergence`] refuses is an error (the update is refused).
    pub(crate) fn clip_scale(&self, norm: f64) -> Result<f32> {
        // The callers report this as divergence first ([`OptimizerConfig::divergence`]); this
        // guards an update that would be applied anyway.
        if let Some(what) = self.config.divergence(norm) {
            return Err(Error::runtime(format!(
                "{what} at step {}: training diverged, the update is refused",
                self.step + 1
            )));
        }
        if self.config.clip > 0.0 {
            let coef = (self.config.clip / (norm + 1e-6)).min(1.0) as f32;
            if coef < 1.0 {
                return Ok(coef);
            }
        }
        Ok(1.0)
    }

    /// The element-wise update's scalars for the next step (`self.step + 1`) at learning rate `lr`;
    /// `keep` is the decayed tensors' (the others keep 1). Shared by the CPU update and the GPU's.
    pub(crate) fn scalars(&self, lr: f64) -> AdamwStep {
        let c = &self.config;
        // Past i32::MAX steps beta^step is 0 in f64 anyway.
        let step = i32::try_from(self.step + 1).unwrap_or(i32::MAX);
        let bc1 = 1.0 - c.beta1.powi(step);
        AdamwStep {
            keep: (1.0 - lr * c.weight_decay) as f32,
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(step)).sqrt() as f32,
            step_size: (lr / bc1) as f32,
            eps: c.eps as f32,
        }
    }
}

/// Fresh AdamW state for `model`, with weight decay on its matrices (see
/// [`crate::model::gpt::TensorSpec`]).
pub fn for_model(config: &OptimizerConfig, model: &crate::model::gpt::Gpt<f32>) -> Result<AdamW> {
    let specs = model.specs();
    let sizes: Vec<usize> = specs.iter().map(|s| s.shape.iter().product()).collect();
    let decay: Vec<bool> = specs.iter().map(|s| s.decay).collect();
    AdamW::with_decay(config.clone(), &sizes, &decay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gradient_whose_square_may_overflow_float32_is_divergence_unless_clipped() {
        // What the check prevents: a gradient element of 2e19 (beta2 0: its square whole) makes
        // the second moment infinite, and the element's update 0 from then on, in silence.
        let (mut p, g, mut m, mut v) = ([1.0f32], [2e19f32], [0.0f32], [0.0f32]);
        let s = AdamwStep {
            keep: 1.0,
            b1: 0.9,
            b2: 0.0,
            bc2_sqrt: 1.0,
            step_size: 1e-3,
            eps: 1e-8,
        };
        adamw_update(&mut p, &g, &mut m, &mut v, s);
        assert!(v[0].is_infinite() && p[0] == 1.0, "{v:?} {p:?}");

        let unclipped = OptimizerConfig {
            clip: 0.0,
            ..OptimizerConfig::default()
        };
        let what = unclipped.divergence(2e19).expect("may overflow");
        assert!(
            what.contains("optimizer.clip 0") && what.contains("may overflow"),
            "{what}"
        );
        assert_eq!(unclipped.divergence(1e19), None);
        assert_eq!(OptimizerConfig::default().divergence(2e19), None, "clipped to 1");
        assert!(OptimizerConfig::default().divergence(f64::NAN).is_some());
        let mut a = AdamW::new(unclipped, &[vec![2]]).unwrap();
        let mut params = vec![1.0f32, 1.0];
        let mut grads = vec![0.0f32, 2e19];
        let e = a
            .step(&mut [&mut params], &mut [&mut grads.clone()], 1e-3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("may overflow") && e.contains("the update is refused"), "{e}");
        assert_eq!((params.clone(), a.step), (vec![1.0, 1.0], 0), "nothing updated");
        // Clipped, the same gradient updates the parameter (its second moment finite).
        let mut b = AdamW::new(OptimizerConfig::default(), &[vec![2]]).unwrap();
        b.step(&mut [&mut params], &mut [&mut grads], 1e-3).unwrap();
        assert!(b.v[0][1].is_finite() && b.v[0][1] > 0.0 && params[1] < 1.0, "{:?}", b.v);
    }

    #[test]
    fn a_copy_with_other_moments_keeps_the_settings_and_checks_the_shapes() {
        let config = OptimizerConfig {
            weight_decay: 0.5,
            ..OptimizerConfig::default()
        };
        let mut a = AdamW::with_decay(config, &[3, 2], &[true, false]).unwrap();
        a.m[0][1] = 7.0;
        let b = a
            .with_moments(5, vec![vec![1.0; 3], vec![2.0; 2]], vec![vec![3.0; 3], vec![4.0; 2]])
            .unwrap();
        assert_eq!((b.step, b.config.weight_decay), (5, 0.5));
        assert_eq!((b.m[0].clone(), b.v[1].clone()), (vec![1.0; 3], vec![4.0; 2]));
        assert_eq!(b.decay, a.decay);
        assert_eq!(a.m[0][1], 7.0, "the original is untouched");
        let e = a
            .with_moments(5, vec![vec![1.0; 3]], vec![vec![3.0; 3], vec![4.0; 2]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("moments do not match"), "{e}");
        assert!(a
            .with_moments(5, vec![vec![1.0; 3], vec![2.0; 3]], a.v.clone())
            .is_err());
        let bare = a.without_moments();
        assert_eq!(bare.m, vec![Vec::<f32>::new(); 2]);
        assert_eq!((bare.decay, bare.step), (a.decay.clone(), a.step));
    }

    #[test]
    fn settings_the_float32_update_cannot_take_are_refused_by_name() {
        let refused = |c: OptimizerConfig, key: &str| {
            let e = c.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{key}: {e}");
        };
        // 1e-46 is 0 in float32: 0 / 0 for every parameter whose gradient has been 0.
        refused(
            OptimizerConfig {
                eps: 1e-46,
                ..OptimizerConfig::default()
            },
            "optimizer.eps",
        );
        // 1 - lr * weight_decay < 0 flips the parameters' signs every step.
        refused(
            OptimizerConfig {
                weight_decay: 1000.0,
                ..OptimizerConfig::default()
            },
            "optimizer.weight_decay",
        );
        OptimizerConfig {
            eps: 1e-30,
            weight_decay: 0.1,
            ..OptimizerConfig::default()
        }
        .validate()
        .expect("usual values");
        // Past i32::MAX steps the bias corrections are 1, not NaN.
        let mut a = AdamW::with_decay(OptimizerConfig::default(), &[2], &[true]).unwrap();
        a.step = u64::from(u32::MAX);
        let s = a.scalars(1e-3);
        assert!(s.bc2_sqrt.is_finite() && s.step_size.is_finite(), "{s:?}");
    }

    #[test]
    fn sum_squares_matches_the_plain_sum_for_every_tail_length() {
        for n in (0..20).chain([1000, 16 * 1024 + 3]) {
            let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let plain: f64 = g.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let got = sum_squares(&g);
            assert!((got - plain).abs() <= 1e-12 * plain.max(1.0), "n={n}: {got} vs {plain}");
        }
        assert_eq!(sum_squares(&[3.0, 4.0]), 25.0);
    }
}
