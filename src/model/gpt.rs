//! A decoder-only transformer with Mixture-of-Experts feed-forward blocks (GPT-style, byte-level).
//!
//! `x = wte[idx] + wpe[pos]`; per block `x += attn(LN1(x))`, `x += FFN(LN2(x))` where FFN is the MoE
//! layer or a dense GELU MLP; `logits = LN_f(x) @ lm_head`; loss = mean cross-entropy plus, for every
//! MoE layer, the mean over groups of `aux_coef * l_aux + z_coef * z_loss`.
//!
//! The model runs one *group* of sequences at a time ([`Gpt::forward_backward`]): the MoE layers
//! route per group (capacity, auxiliary loss), and every matmul's shape follows from the config, so
//! the group's contribution is the same wherever it is computed. Gradients live in a second `Gpt`
//! with the same shapes ([`Gpt::zeros_like`]), as in llm.c.

use super::layers;
use super::moe::{DropPolicy, MoeCache, MoeConfig, MoeLayer, MoeParams, MoeStats};
use super::pass::{GroupPass, MoeResult, Need};
use crate::error::{Error, Result};
use crate::kernels::{Backend, Gelu, Scalar};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Model hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GptConfig {
    /// Vocabulary size (256: bytes).
    pub vocab: usize,
    /// Context length.
    pub block_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads (d_model must be a multiple).
    pub n_head: usize,
    /// Hidden width of each expert.
    pub d_ff: usize,
    /// Hidden width of the dense feed-forward blocks (0: same as `d_ff`).
    pub dense_d_ff: usize,
    /// Block `l` is MoE when `l % moe_every == moe_every - 1`; 1 = every block, 0 = none (dense model).
    pub moe_every: usize,
    /// Experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub k: usize,
    /// Expert capacity factor (per group).
    pub capacity_factor: f64,
    /// Minimum expert capacity.
    pub min_capacity: usize,
    /// Keep every assignment (no capacity).
    pub dropless: bool,
    /// Which assignments an over-subscribed expert keeps.
    pub drop_policy: DropPolicy,
    /// Renormalise the kept routes' gate values (k >= 2).
    pub normalize: bool,
    /// Weight of the load-balancing loss.
    pub aux_coef: f64,
    /// Weight of the router z-loss.
    pub z_coef: f64,
    /// GELU form of the feed-forward blocks.
    pub gelu: Gelu,
}

/// The main job's model. Its size was chosen by measurement for a five-minute run on two cores
/// (BENCHMARKS.md): for the same training time, 3 blocks of width 128 reach a lower validation loss
/// than 4 blocks of width 128 or 96, and far lower than 4 blocks of width 192, which spend the
/// budget on a model too large for the tokens it can see in five minutes.
impl Default for GptConfig {
    fn default() -> Self {
        GptConfig {
            vocab: 256,
            block_size: 64,
            d_model: 128,
            n_layer: 3,
            n_head: 4,
            d_ff: 256,
            dense_d_ff: 0,
            moe_every: 1,
            experts: 8,
            k: 2,
            capacity_factor: 1.25,
            min_capacity: 4,
            dropless: false,
            drop_policy: DropPolicy::Position,
            normalize: true,
            aux_coef: 0.01,
            z_coef: 0.0,
            gelu: Gelu::Tanh,
        }
    }
}

/// The most transformer blocks a model may have.
pub const MAX_LAYERS: usize = 1 << 16;

impl GptConfig {
    /// Check the values; the error names the offending option.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("block_size", self.block_size),
            ("d_model", self.d_model),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("d_ff", self.d_ff),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::config(format!("model.{name} must be positive")));
        }
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(Error::config(format!(
                "model.d_model ({}) must be a multiple of model.n_head ({})",
                self.d_model, self.n_head
            )));
        }
        if self.vocab > u32::MAX as usize {
            return Err(Error::config("model.vocab is too large"));
        }
        if self.n_layer > MAX_LAYERS {
            return Err(Error::config(format!(
                "model.n_layer ({}) must be at most {MAX_LAYERS}",
                self.n_layer
            )));
        }
        if self.has_moe() {
            // The MoE layer's messages name its own fields; here they are keys of [model].
            self.moe_config().validate().map_err(|e| match e {
                Error::Config(msg) => Error::Config(format!("model.{msg}")),
                other => other,
            })?;
        }
        // Every tensor's size computed checked: a config whose sizes overflow is refused by name
        // here, before anything is allocated from it.
        self.checked_tensor_shapes(self.n_layer).map(drop)
    }

    /// The sequence length of `seqs` equal sequences of tokens `idx`, checked against the context
    /// and the vocabulary.
    pub(crate) fn check_tokens(&self, idx: &[u32], seqs: usize) -> Result<usize> {
        let c = self;
        if seqs == 0 || !idx.len().is_multiple_of(seqs) {
            return Err(Error::shape(
                "model input",
                format!("{} tokens are not {seqs} equal sequences", idx.len()),
            ));
        }
        let t = idx.len() / seqs;
        if t == 0 || t > c.block_size {
            return Err(Error::shape(
                "model input",
                format!("sequence length {t} must be in 1..={}", c.block_size),
            ));
        }
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= c.vocab) {
            return Err(Error::shape(
                "model input",
                format!("token {bad} is outside the vocabulary ({})", c.vocab),
            ));
        }
        Ok(t)
    }

    /// Check that `targets` are one per token of `idx` and inside the vocabulary.
    pub(crate) fn check_targets(&self, idx: &[u32], targets: &[u32]) -> Result<()> {
        if targets.len() != idx.len() {
            return Err(Error::shape(
                "targets",
                format!("{} targets for {} tokens", targets.len(), idx.len()),
            ));
        }
        if let Some(bad) = targets.iter().find(|&&i| i as usize >= self.vocab) {
            return Err(Error::shape(
                "targets",
                format!("token {bad} is outside the vocabulary"),
            ));
        }
        Ok(())
    }

    /// Whether block `l` is an MoE block.
    pub fn is_moe(&self, l: usize) -> bool {
        self.moe_every > 0 && l % self.moe_every == self.moe_every - 1
    }

    /// Whether any block is an MoE block.
    pub fn has_moe(&self) -> bool {
        self.moe_layers() > 0
    }

    /// How many blocks are MoE blocks (every `moe_every`-th, counted without visiting each block:
    /// a config's `n_layer` may be absurd).
    pub fn moe_layers(&self) -> usize {
        self.n_layer.checked_div(self.moe_every).unwrap_or(0)
    }

    /// Hidden width of the dense blocks.
    pub fn dense_width(&self) -> usize {
        if self.dense_d_ff == 0 {
            self.d_ff
        } else {
            self.dense_d_ff
        }
    }

    /// [`GptConfig::tensor_shapes`] with each tensor's element count, for a configuration read
    /// from a file that holds `tensors_in_file` tensors: a size that overflows, or more layers
    /// than the file could hold (each has tensors of its own), is an error naming it, before
    /// anything the size of the model is allocated (a manifest's config is not covered by the
    /// model file's digest). Large shapes (d_model ~ 2^33) overflow already in the shape itself
    /// (`3 * d`): checked here before use.
    pub fn checked_tensor_shapes(&self, tensors_in_file: usize) -> Result<Vec<(String, Vec<usize>, usize)>> {
        let limit = |x: usize| x <= u32::MAX as usize;
        let dims = [
            self.d_model,
            self.vocab,
            self.block_size,
            self.d_ff,
            self.dense_width(),
            self.experts,
        ];
        if !dims.iter().all(|&x| limit(x)) {
            return Err(Error::config(format!(
                "the model config is too large (d_model {}, vocab {}, block_size {}, d_ff {}, experts {})",
                self.d_model, self.vocab, self.block_size, self.d_ff, self.experts
            )));
        }
        if self.n_layer > tensors_in_file {
            return Err(Error::config(format!(
                "the model config's n_layer ({}) is more than its file's {tensors_in_file} tensors can hold",
                self.n_layer
            )));
        }
        self.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n = shape
                    .iter()
                    .try_fold(1usize, |acc, &x| acc.checked_mul(x))
                    .filter(|&n| n <= isize::MAX as usize / 4)
                    .ok_or_else(|| {
                        Error::config(format!("the model config makes tensor {name} too large ({shape:?})"))
                    })?;
                Ok((name, shape, n))
            })
            .collect()
    }

    /// The name and shape of every parameter tensor of a model of this configuration, in the
    /// checkpoint and optimizer order (names follow `tools/reference/gpt_reference.py`). Computed
    /// from the configuration alone, so that a reader can check a checkpoint without building the
    /// model (ring-memory inference reads models larger than memory).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, v) = (self.d_model, self.vocab);
        let mut out = vec![
            ("wte".to_string(), vec![v, d]),
            ("wpe".to_string(), vec![self.block_size, d]),
        ];
        for l in 0..self.n_layer {
            let n = |s: &str| format!("h.{l}.{s}");
            out.extend([
                (n("ln1.weight"), vec![d]),
                (n("ln1.bias"), vec![d]),
                (n("attn.wqkv"), vec![d, 3 * d]),
                (n("attn.bqkv"), vec![3 * d]),
                (n("attn.wo"), vec![d, d]),
                (n("attn.bo"), vec![d]),
                (n("ln2.weight"), vec![d]),
                (n("ln2.bias"), vec![d]),
            ]);
            if self.is_moe(l) {
                let (e, f) = (self.experts, self.d_ff);
                out.extend([
                    (n("moe.wg"), vec![d, e]),
                    (n("moe.w1"), vec![e, d, f]),
                    (n("moe.b1"), vec![e, f]),
                    (n("moe.w2"), vec![e, f, d]),
                    (n("moe.b2"), vec![e, d]),
                ]);
            } else {
                let f = self.dense_width();
                out.extend([
                    (n("mlp.w1"), vec![d, f]),
                    (n("mlp.b1"), vec![f]),
                    (n("mlp.w2"), vec![f, d]),
                    (n("mlp.b2"), vec![d]),
                ]);
            }
        }
        out.extend([
            ("ln_f.weight".to_string(), vec![d]),
            ("ln_f.bias".to_string(), vec![d]),
            ("lm_head".to_string(), vec![d, v]),
        ]);
        out
    }

    /// How each tensor of [`GptConfig::tensor_shapes`] is owned and optimised, from the
    /// configuration alone (no model of zeros is built: the coordinator checks every snapshot and
    /// share against these, tens of megabytes a model would cost to allocate and clear each time).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let experts = self.experts;
        self.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let expert = is_expert_tensor(&name);
                let unit_dims = if expert { shape.len() - 1 } else { shape.len() };
                TensorSpec {
                    experts: if expert { experts } else { 1 },
                    expert,
                    decay: unit_dims >= 2,
                    name,
                    shape,
                }
            })
            .collect()
    }

    /// The number of parameters of a model of this configuration.
    pub fn num_params(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// The configuration of the MoE blocks.
    pub fn moe_config(&self) -> MoeConfig {
        MoeConfig {
            d_model: self.d_model,
            d_ff: self.d_ff,
            experts: self.experts,
            k: self.k,
            capacity_factor: self.capacity_factor,
            min_capacity: self.min_capacity,
            dropless: self.dropless,
            drop_policy: self.drop_policy,
            normalize: self.normalize,
            aux_coef: self.aux_coef,
            z_coef: self.z_coef,
            gelu: self.gelu,
        }
    }
}

/// The dense feed-forward block's parameters.
#[derive(Clone, Debug)]
pub struct Mlp<T> {
    /// `[D][F]`
    pub w1: Vec<T>,
    /// `[F]`
    pub b1: Vec<T>,
    /// `[F][D]`
    pub w2: Vec<T>,
    /// `[D]`
    pub b2: Vec<T>,
}

/// A block's feed-forward part.
#[derive(Clone, Debug)]
pub enum Ffn<T> {
    /// Dense GELU MLP.
    Dense(Mlp<T>),
    /// Mixture of experts.
    Moe(MoeLayer<T>),
}

/// One transformer block's parameters.
#[derive(Clone, Debug)]
pub struct Block<T> {
    /// LN1 scale `[D]`.
    pub ln1_w: Vec<T>,
    /// LN1 shift `[D]`.
    pub ln1_b: Vec<T>,
    /// Fused q|k|v projection `[D][3D]`.
    pub wqkv: Vec<T>,
    /// `[3D]`
    pub bqkv: Vec<T>,
    /// Output projection `[D][D]`.
    pub wo: Vec<T>,
    /// `[D]`
    pub bo: Vec<T>,
    /// LN2 scale `[D]`.
    pub ln2_w: Vec<T>,
    /// LN2 shift `[D]`.
    pub ln2_b: Vec<T>,
    /// The feed-forward part.
    pub ffn: Ffn<T>,
}

/// The model (or, with the same shapes, its gradients).
#[derive(Clone, Debug)]
pub struct Gpt<T> {
    config: GptConfig,
    /// Token embeddings `[V][D]`.
    pub wte: Vec<T>,
    /// Position embeddings `[block_size][D]`.
    pub wpe: Vec<T>,
    /// The blocks.
    pub blocks: Vec<Block<T>>,
    /// Final LN scale `[D]`.
    pub ln_f_w: Vec<T>,
    /// Final LN shift `[D]`.
    pub ln_f_b: Vec<T>,
    /// Output projection `[D][V]` (not tied to `wte`).
    pub lm_head: Vec<T>,
}

/// How a parameter tensor is owned and optimised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name (as in checkpoints).
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// 1 for a dense tensor; E for an expert tensor, whose leading dimension is the expert and whose
    /// slices live with their experts' owners.
    pub experts: usize,
    /// Whether it is an expert tensor (stacked over experts). Not the same as `experts > 1`: with a
    /// single expert an expert tensor also has `experts == 1`, yet its one slice still lives with
    /// the expert's owner, not with a dense tensor's owner (issue 18).
    pub expert: bool,
    /// Whether AdamW decays it: matrices do; biases, norms and per-expert biases do not.
    pub decay: bool,
}

impl TensorSpec {
    /// Elements of one unit (the whole tensor, or one expert's slice).
    pub fn unit_len(&self) -> usize {
        self.shape.iter().product::<usize>() / self.experts
    }
}

/// Whether a tensor name is one of an MoE block's expert tensors (stacked over experts).
pub fn is_expert_tensor(name: &str) -> bool {
    name.contains(".moe.") && !name.ends_with("moe.wg")
}

/// A named parameter tensor: name, shape, and its buffer.
pub type NamedBuffer<'a, T> = (String, Vec<usize>, &'a Vec<T>);

/// What one group's forward (and backward) reports.
#[derive(Clone, Debug, Default)]
pub struct GroupOutput {
    /// Sum of the cross-entropy over the group's positions (nats).
    pub ce_sum: f64,
    /// Per MoE block: `aux_coef * l_aux + z_coef * z_loss` of this group.
    pub router_loss: Vec<f64>,
    /// Per MoE block: load statistics.
    pub moe_stats: Vec<MoeStats>,
}

impl<T: Scalar> Gpt<T> {
    /// A freshly initialised model: matrices ~ N(0, 0.02), the residual projections (`wo`, the second
    /// FFN matrix) scaled by `1/sqrt(2 n_layer)` (GPT-2), biases 0, layer-norm scales 1.
    pub fn init(config: &GptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize, std: f64| -> Result<Vec<T>> {
            let dist = Normal::new(0.0, std).map_err(|e| Error::config(format!("initialiser: {e}")))?;
            Ok((0..n).map(|_| T::from_f64(dist.sample(&mut rng))).collect())
        };
        let (d, v) = (config.d_model, config.vocab);
        let resid = 0.02 / (2.0 * config.n_layer as f64).sqrt();
        let mut model = Gpt::zeros(config)?;
        model.wte = normal(v * d, 0.02)?;
        model.wpe = normal(config.block_size * d, 0.01)?;
        model.lm_head = normal(d * v, 0.02)?;
        for block in &mut model.blocks {
            block.ln1_w.fill(T::ONE);
            block.ln2_w.fill(T::ONE);
            block.wqkv = normal(d * 3 * d, 0.02)?;
            block.wo = normal(d * d, resid)?;
            match &mut block.ffn {
                Ffn::Dense(m) => {
                    m.w1 = normal(m.w1.len(), 0.02)?;
                    m.w2 = normal(m.w2.len(), resid)?;
                }
                Ffn::Moe(layer) => {
                    let p = &mut layer.params;
                    p.wg = normal(p.wg.len(), 0.02)?;
                    p.w1 = normal(p.w1.len(), 0.02)?;
                    p.w2 = normal(p.w2.len(), resid)?;
                }
            }
        }
        model.ln_f_w.fill(T::ONE);
        Ok(model)
    }

    /// A model of zeros (the gradient accumulator).
    pub fn zeros(config: &GptConfig) -> Result<Self> {
        config.validate()?;
        let (d, v) = (config.d_model, config.vocab);
        let z = |n: usize| vec![T::ZERO; n];
        let blocks = (0..config.n_layer)
            .map(|l| {
                let ffn = if config.is_moe(l) {
                    let mc = config.moe_config();
                    Ffn::Moe(MoeLayer::new(mc.clone(), MoeParams::zeros(&mc))?)
                } else {
                    let f = config.dense_width();
                    Ffn::Dense(Mlp {
                        w1: z(d * f),
                        b1: z(f),
                        w2: z(f * d),
                        b2: z(d),
                    })
                };
                Ok(Block {
                    ln1_w: z(d),
                    ln1_b: z(d),
                    wqkv: z(d * 3 * d),
                    bqkv: z(3 * d),
                    wo: z(d * d),
                    bo: z(d),
                    ln2_w: z(d),
                    ln2_b: z(d),
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gpt {
            config: config.clone(),
            wte: z(v * d),
            wpe: z(config.block_size * d),
            blocks,
            ln_f_w: z(d),
            ln_f_b: z(d),
            lm_head: z(d * v),
        })
    }

    /// Zeros for every dense tensor, with the expert tensors of MoE blocks left empty (the gate
    /// weights are dense and kept): the per-group gradient buffers of the actor runtime, whose
    /// expert gradients stay with the experts.
    pub fn dense_zeros(config: &GptConfig) -> Result<Self> {
        let mut model = Gpt::zeros(&GptConfig {
            moe_every: 0,
            dense_d_ff: config.dense_width(),
            ..config.clone()
        })?;
        model.config = config.clone();
        let (d, e) = (config.d_model, config.experts);
        for (l, b) in model.blocks.iter_mut().enumerate() {
            if config.is_moe(l) {
                let params = MoeParams {
                    wg: vec![T::ZERO; d * e],
                    w1: Vec::new(),
                    b1: Vec::new(),
                    w2: Vec::new(),
                    b2: Vec::new(),
                };
                b.ffn = Ffn::Moe(MoeLayer::new_partial(config.moe_config(), params));
            }
        }
        Ok(model)
    }

    /// Zeros with this model's shapes.
    pub fn zeros_like(&self) -> Result<Self> {
        Gpt::zeros(&self.config)
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// Every parameter tensor with its name and shape, in a fixed order (the checkpoint and optimizer
    /// order; see [`GptConfig::tensor_shapes`]).
    pub fn tensors(&self) -> Vec<NamedBuffer<'_, T>> {
        self.config
            .tensor_shapes()
            .into_iter()
            .zip(self.buffers())
            .map(|((name, shape), buf)| (name, shape, buf))
            .collect()
    }

    /// The buffers of [`Gpt::tensors`], in the same order ([`Gpt::buffers_mut`]'s, read-only).
    fn buffers(&self) -> Vec<&Vec<T>> {
        let mut out: Vec<&Vec<T>> = vec![&self.wte, &self.wpe];
        for b in &self.blocks {
            out.extend([&b.ln1_w, &b.ln1_b, &b.wqkv, &b.bqkv, &b.wo, &b.bo, &b.ln2_w, &b.ln2_b]);
            match &b.ffn {
                Ffn::Dense(m) => out.extend([&m.w1, &m.b1, &m.w2, &m.b2]),
                Ffn::Moe(layer) => {
                    let p = &layer.params;
                    out.extend([&p.wg, &p.w1, &p.b1, &p.w2, &p.b2]);
                }
            }
        }
        out.extend([&self.ln_f_w, &self.ln_f_b, &self.lm_head]);
        out
    }

    /// How each tensor of [`Gpt::tensors`] is owned and optimised, in the same order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.config.tensor_specs()
    }

    /// The buffers of [`Gpt::tensors`], mutable, in the same order.
    pub fn buffers_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut out: Vec<&mut Vec<T>> = vec![&mut self.wte, &mut self.wpe];
        for b in &mut self.blocks {
            out.extend([
                &mut b.ln1_w,
                &mut b.ln1_b,
                &mut b.wqkv,
                &mut b.bqkv,
                &mut b.wo,
                &mut b.bo,
            ]);
            out.extend([&mut b.ln2_w, &mut b.ln2_b]);
            match &mut b.ffn {
                Ffn::Dense(m) => out.extend([&mut m.w1, &mut m.b1, &mut m.w2, &mut m.b2]),
                Ffn::Moe(layer) => {
                    let p = &mut layer.params;
                    out.extend([&mut p.wg, &mut p.w1, &mut p.b1, &mut p.w2, &mut p.b2]);
                }
            }
        }
        out.extend([&mut self.ln_f_w, &mut self.ln_f_b, &mut self.lm_head]);
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(|(_, _, b)| b.len()).sum()
    }

    /// Parameters a token actually uses: MoE blocks count `k` experts of `E`.
    pub fn active_params(&self) -> usize {
        let c = &self.config;
        self.tensors()
            .iter()
            .map(|(name, _, b)| {
                if is_expert_tensor(name) {
                    b.len() / c.experts * c.k
                } else {
                    b.len()
                }
            })
            .sum()
    }

    /// The same weights with dropless routing in every MoE block (for generation: a single sequence
    /// should not lose tokens to capacity).
    pub fn for_inference(&self) -> Result<Self> {
        let mut m = self.clone();
        m.config.dropless = true;
        let mc = m.config.moe_config();
        for b in &mut m.blocks {
            if let Ffn::Moe(layer) = &mut b.ffn {
                *layer = layer.reconfigured(mc.clone())?;
            }
        }
        Ok(m)
    }

    pub(crate) fn check_tokens(&self, idx: &[u32], seqs: usize) -> Result<usize> {
        self.config.check_tokens(idx, seqs)
    }

    /// Logits `[N][V]` of `seqs` sequences of tokens `idx` (forward only).
    pub fn logits<B: Backend>(&self, backend: &B, idx: &[u32], seqs: usize) -> Result<Vec<T>> {
        let mut pass = GroupPass::<T, &Gpt<T>, &mut Gpt<T>>::new(self, idx.to_vec(), None, seqs, T::ONE, None)?;
        let mut local = LocalMoe::default();
        while let Need::MoeForward { block, x } = pass.advance(backend)? {
            let result = local.forward(self, backend, block, x, false)?;
            pass.moe_forward_done(result)?;
        }
        let x = pass.into_residual()?;
        let (xf, _) = layers::layer_norm_forward(&x, &self.ln_f_w, &self.ln_f_b);
        layers::linear_forward(backend, &xf, &self.lm_head, None, self.config.vocab)
    }

    /// Forward only: the group's summed cross-entropy and router losses (evaluation).
    pub fn evaluate<B: Backend>(&self, backend: &B, idx: &[u32], targets: &[u32], seqs: usize) -> Result<GroupOutput> {
        self.check_targets(idx, targets)?;
        let logits = self.logits(backend, idx, seqs)?;
        let mut scratch = vec![T::ZERO; logits.len()];
        let ce_sum = layers::cross_entropy(&logits, targets, T::ZERO, &mut scratch);
        Ok(GroupOutput {
            ce_sum,
            ..GroupOutput::default()
        })
    }

    pub(crate) fn check_targets(&self, idx: &[u32], targets: &[u32]) -> Result<()> {
        self.config.check_targets(idx, targets)
    }

    /// The load statistics of each MoE block, in order, for one routing group of `seqs` sequences
    /// of tokens `idx` (forward only, through the gate code of training): which experts the
    /// model's routing sends tokens to, and how many.
    pub fn moe_stats<B: Backend>(&self, backend: &B, idx: &[u32], seqs: usize) -> Result<Vec<MoeStats>> {
        let mut pass = GroupPass::<T, &Gpt<T>, &mut Gpt<T>>::new(self, idx.to_vec(), None, seqs, T::ONE, None)?;
        let mut local = LocalMoe::default();
        let mut stats = Vec::new();
        while let Need::MoeForward { block, x } = pass.advance(backend)? {
            let result = local.forward(self, backend, block, x, false)?;
            stats.push(result.stats.clone());
            pass.moe_forward_done(result)?;
        }
        Ok(stats)
    }

    /// Forward and backward of one group of `seqs` sequences. Adds into `grads` the gradient of
    /// `ce_scale * sum(cross-entropy) + router_scale * sum over MoE blocks of (aux_coef * l_aux +
    /// z_coef * z_loss)`. A batch of G groups and B*T tokens uses `ce_scale = 1/(B*T)` and
    /// `router_scale = 1/G`, so that the sum over groups is the batch loss.
    ///
    /// This is a [`GroupPass`] whose MoE blocks run here, in this thread; the actor runtime drives
    /// the same pass with the MoE blocks run by its Gate and Expert actors.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward<B: Backend>(
        &self,
        backend: &B,
        idx: &[u32],
        targets: &[u32],
        seqs: usize,
        ce_scale: T,
        router_scale: T,
        grads: &mut Gpt<T>,
    ) -> Result<GroupOutput> {
        let mut pass = GroupPass::new(self, idx.to_vec(), Some(targets.to_vec()), seqs, ce_scale, Some(grads))?;
        let mut local = LocalMoe::default();
        loop {
            match pass.advance(backend)? {
                Need::MoeForward { block, x } => {
                    let result = local.forward(self, backend, block, x, true)?;
                    pass.moe_forward_done(result)?;
                }
                Need::MoeBackward { block, dy } => {
                    let grads = pass.grads_mut().ok_or_else(|| Error::shape("gradients", "missing"))?;
                    let dx = local.backward(self, backend, block, &dy, grads, router_scale)?;
                    pass.moe_backward_done(backend, dx)?;
                }
                Need::Done => return pass.finish().map(|(out, _)| out),
            }
        }
    }
}

/// The MoE blocks of a [`GroupPass`] run in the calling thread, keeping their caches until the
/// backward pass.
#[derive(Default)]
struct LocalMoe<T> {
    saved: Vec<Option<(Vec<T>, MoeCache<T>)>>,
}

impl<T: Scalar> LocalMoe<T> {
    fn layer(model: &Gpt<T>, block: usize) -> Result<&MoeLayer<T>> {
        match model.blocks.get(block).map(|b| &b.ffn) {
            Some(Ffn::Moe(layer)) => Ok(layer),
            _ => Err(Error::shape("model", format!("block {block} is not an MoE block"))),
        }
    }

    fn forward<B: Backend>(
        &mut self,
        model: &Gpt<T>,
        backend: &B,
        block: usize,
        x: Vec<T>,
        keep: bool,
    ) -> Result<MoeResult<T>> {
        let (out, cache) = Self::layer(model, block)?.forward(backend, &x)?;
        if keep {
            if self.saved.len() <= block {
                self.saved.resize_with(block + 1, || None);
            }
            self.saved[block] = Some((x, cache));
        }
        Ok(MoeResult {
            y: out.y,
            l_aux: out.l_aux.to_f64(),
            z_loss: out.z_loss.to_f64(),
            stats: out.stats,
        })
    }

    fn backward<B: Backend>(
        &mut self,
        model: &Gpt<T>,
        backend: &B,
        block: usize,
        dy: &[T],
        grads: &mut Gpt<T>,
        router_scale: T,
    ) -> Result<Vec<T>> {
        let (x, cache) = self
            .saved
            .get_mut(block)
            .and_then(Option::take)
            .ok_or_else(|| Error::shape("MoE backward", format!("block {block} has no forward cache")))?;
        let layer = Self::layer(model, block)?;
        match grads.blocks.get_mut(block).map(|b| &mut b.ffn) {
            Some(Ffn::Moe(g)) => layer.backward_scaled(backend, &x, cache, dy, &mut g.params, router_scale),
            _ => Err(Error::shape("gradients", "block kinds of model and gradients differ")),
        }
    }
}
