//! Configuration of an MoE layer, and its validation.

use crate::error::{Error, Result};
use crate::kernels::Gelu;
use serde::{Deserialize, Serialize};

/// Which assignments an over-subscribed expert keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicy {
    /// Slots are taken in order: every token's first choice (in token order) before any second
    /// choice, and so on (DeepSpeed's top2gating semantics, generalised to k).
    #[default]
    Position,
    /// The assignments with the highest gate probability are kept (ties: earlier choice, then
    /// earlier token).
    Probs,
}

/// Hyper-parameters of one MoE layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MoeConfig {
    /// Width of the token representations.
    pub d_model: usize,
    /// Hidden width of each expert's feed-forward network.
    pub d_ff: usize,
    /// Number of experts `E`.
    pub experts: usize,
    /// Experts per token (top-k), 1 <= k <= E.
    pub k: usize,
    /// Capacity per expert is `max(ceil(k * capacity_factor * S / E), min_capacity)` for `S` tokens.
    pub capacity_factor: f64,
    /// Lower bound on the capacity.
    pub min_capacity: usize,
    /// Ignore the capacity: every assignment is kept.
    pub dropless: bool,
    /// How an over-subscribed expert chooses which assignments to keep.
    pub drop_policy: DropPolicy,
    /// For k >= 2: renormalise the kept routes' gate values to sum to 1.
    pub normalize: bool,
    /// Coefficient of the auxiliary load-balancing loss in the training loss.
    pub aux_coef: f64,
    /// Coefficient of the router z-loss (0 turns it off).
    pub z_coef: f64,
    /// Activation of the experts.
    pub gelu: Gelu,
}

impl Default for MoeConfig {
    fn default() -> Self {
        MoeConfig {
            d_model: 512,
            d_ff: 2048,
            experts: 8,
            k: 2,
            capacity_factor: 1.0,
            min_capacity: 4,
            dropless: false,
            drop_policy: DropPolicy::Position,
            normalize: true,
            aux_coef: 0.01,
            z_coef: 0.0,
            gelu: Gelu::Erf,
        }
    }
}

impl MoeConfig {
    /// Check every value; the error names the offending option.
    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0 || self.d_ff == 0 {
            return Err(Error::config(format!(
                "d_model ({}) and d_ff ({}) must be positive",
                self.d_model, self.d_ff
            )));
        }
        if self.experts == 0 {
            return Err(Error::config("experts must be at least 1"));
        }
        if self.experts > u32::MAX as usize / 2 {
            return Err(Error::config(format!("experts ({}) is too large", self.experts)));
        }
        // The experts' weights are one tensor of experts x d_model x d_ff floats: a size that
        // overflows (or no allocation could hold) is refused here, not by a panic or an abort.
        let floats = [self.experts, self.d_model, self.d_ff]
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .filter(|&n| n <= isize::MAX as usize / 4);
        if floats.is_none() {
            return Err(Error::config(format!(
                "experts x d_model x d_ff ({} x {} x {}) is too large for the experts' weights",
                self.experts, self.d_model, self.d_ff
            )));
        }
        if self.k == 0 || self.k > self.experts {
            return Err(Error::config(format!(
                "k (experts per token) must be between 1 and the number of experts ({}), got {}",
                self.experts, self.k
            )));
        }
        if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
            return Err(Error::config(format!(
                "capacity_factor must be a positive number, got {}",
                self.capacity_factor
            )));
        }
        if !(self.aux_coef.is_finite() && self.aux_coef >= 0.0) {
            return Err(Error::config(format!(
                "aux_coef must be a non-negative number, got {}",
                self.aux_coef
            )));
        }
        if !(self.z_coef.is_finite() && self.z_coef >= 0.0) {
            return Err(Error::config(format!(
                "z_coef must be a non-negative number, got {}",
                self.z_coef
            )));
        }
        Ok(())
    }

    /// The capacity per expert for a group of `tokens` tokens; `None` in dropless mode.
    pub fn capacity(&self, tokens: usize) -> Option<usize> {
        if self.dropless {
            return None;
        }
        // Same operation order as the reference: ((k * cf) * S) / E, then ceil.
        let c = (self.k as f64 * self.capacity_factor * tokens as f64 / self.experts as f64).ceil();
        Some((c as usize).max(self.min_capacity))
    }

    /// Elements of one expert's parameters (w1, b1, w2, b2).
    pub fn expert_params(&self) -> usize {
        2 * self.d_model * self.d_ff + self.d_ff + self.d_model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_named() {
        let ok = MoeConfig::default();
        assert!(ok.validate().is_ok());
        let cases = [
            (MoeConfig { k: 9, ..ok.clone() }, "k (experts per token)"),
            (MoeConfig { k: 0, ..ok.clone() }, "k (experts per token)"),
            (
                MoeConfig {
                    capacity_factor: 0.0,
                    ..ok.clone()
                },
                "capacity_factor",
            ),
            (
                MoeConfig {
                    capacity_factor: -1.0,
                    ..ok.clone()
                },
                "capacity_factor",
            ),
            (
                MoeConfig {
                    capacity_factor: f64::NAN,
                    ..ok.clone()
                },
                "capacity_factor",
            ),
            (
                MoeConfig {
                    experts: 0,
                    ..ok.clone()
                },
                "experts",
            ),
            (MoeConfig { d_ff: 0, ..ok.clone() }, "d_ff"),
            (
                MoeConfig {
                    aux_coef: -0.1,
                    ..ok.clone()
                },
                "aux_coef",
            ),
        ];
        for (config, word) in cases {
            let err = config.validate().expect_err("must be rejected").to_string();
            assert!(err.contains(word), "{err:?} should name {word}");
        }
    }

    #[test]
    fn capacity_formula() {
        let c = MoeConfig {
            k: 2,
            experts: 8,
            capacity_factor: 1.0,
            min_capacity: 4,
            ..MoeConfig::default()
        };
        assert_eq!(c.capacity(4096), Some(1024));
        assert_eq!(c.capacity(37), Some(10)); // ceil(74 / 8)
        assert_eq!(c.capacity(3), Some(4)); // min_capacity
        assert_eq!(MoeConfig { dropless: true, ..c }.capacity(37), None);
    }
}
