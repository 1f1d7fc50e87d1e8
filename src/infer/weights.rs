//! Where the decoder reads its weights from, one *piece* at a time.
//!
//! A forward pass reads the model in a fixed order of pieces: each block's attention part (layer
//! norms, projections, and the gate of an MoE block), then its feed-forward part (the dense MLP, or
//! the experts the batch routes to, in increasing expert order), and finally the head. The decoder
//! asks a [`WeightSource`] for each piece in that order and never holds two at once, so a source may
//! keep the whole model in memory ([`ResidentWeights`]) or stream the pieces through a ring of
//! memory sections under a budget (`infer::ring`): the arithmetic, and so the bits, are the same.

use crate::error::{Error, Result};
use crate::model::gpt::{Ffn, Gpt, GptConfig};
use crate::model::moe::stages::ExpertWeights;

/// One piece of the model, in the order a forward pass reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Piece {
    /// Block `l`'s layer norms, attention projections and, in an MoE block, the gate.
    Attention(usize),
    /// Block `l`'s dense feed-forward network.
    Dense(usize),
    /// Expert `e` of MoE block `l`.
    Expert(usize, usize),
    /// The final layer norm and the output projection.
    Head,
}

/// The attention part of a block (and its gate).
#[derive(Clone, Copy, Debug)]
pub struct AttentionWeights<'a> {
    /// LN1 scale and shift `[D]`.
    pub ln1_w: &'a [f32],
    /// LN1 shift `[D]`.
    pub ln1_b: &'a [f32],
    /// `[D][3D]`
    pub wqkv: &'a [f32],
    /// `[3D]`
    pub bqkv: &'a [f32],
    /// `[D][D]`
    pub wo: &'a [f32],
    /// `[D]`
    pub bo: &'a [f32],
    /// LN2 scale `[D]`.
    pub ln2_w: &'a [f32],
    /// LN2 shift `[D]`.
    pub ln2_b: &'a [f32],
    /// The gate `[D][E]` of an MoE block; empty for a dense block.
    pub wg: &'a [f32],
}

/// The head.
#[derive(Clone, Copy, Debug)]
pub struct HeadWeights<'a> {
    /// Final LN scale `[D]`.
    pub ln_f_w: &'a [f32],
    /// Final LN shift `[D]`.
    pub ln_f_b: &'a [f32],
    /// `[D][V]`
    pub lm_head: &'a [f32],
}

/// An MoE block's LN2 and gate, for predicting its routing ahead of time.
#[derive(Clone, Copy, Debug)]
pub struct RouterWeights<'a> {
    /// LN2 scale `[D]`.
    pub ln2_w: &'a [f32],
    /// LN2 shift `[D]`.
    pub ln2_b: &'a [f32],
    /// The gate `[D][E]`.
    pub wg: &'a [f32],
}

/// A piece's weights, as the decoder reads them.
#[derive(Clone, Copy, Debug)]
pub enum PieceWeights<'a> {
    /// [`Piece::Attention`].
    Attention(AttentionWeights<'a>),
    /// [`Piece::Dense`] or [`Piece::Expert`]: `GELU(x w1 + b1) w2 + b2`.
    Ffn(ExpertWeights<'a, f32>),
    /// [`Piece::Head`].
    Head(HeadWeights<'a>),
}

/// The tensor lengths of each piece, in the order they are laid out in a flat buffer (the ring's
/// sections and the checkpoint reader use this layout).
pub fn piece_layout(config: &GptConfig, piece: Piece) -> Vec<usize> {
    let (d, v) = (config.d_model, config.vocab);
    match piece {
        Piece::Attention(l) => {
            let gate = if config.is_moe(l) { d * config.experts } else { 0 };
            vec![d, d, d * 3 * d, 3 * d, d * d, d, d, d, gate]
        }
        Piece::Dense(_) => {
            let f = config.dense_width();
            vec![d * f, f, f * d, d]
        }
        Piece::Expert(..) => {
            let f = config.d_ff;
            vec![d * f, f, f * d, d]
        }
        Piece::Head => vec![d, d, d * v],
    }
}

/// Elements of a piece.
pub fn piece_len(config: &GptConfig, piece: Piece) -> usize {
    piece_layout(config, piece).iter().sum()
}

/// Every piece of a full forward pass in reading order, with every expert of every MoE block.
pub fn all_pieces(config: &GptConfig) -> Vec<Piece> {
    let mut out = Vec::new();
    for l in 0..config.n_layer {
        out.push(Piece::Attention(l));
        if config.is_moe(l) {
            out.extend((0..config.experts).map(|e| Piece::Expert(l, e)));
        } else {
            out.push(Piece::Dense(l));
        }
    }
    out.push(Piece::Head);
    out
}

/// Split a flat buffer laid out by [`piece_layout`] into the piece's views.
pub fn split_piece<'a>(config: &GptConfig, piece: Piece, flat: &'a [f32]) -> Result<PieceWeights<'a>> {
    let layout = piece_layout(config, piece);
    let total: usize = layout.iter().sum();
    if flat.len() != total {
        return Err(Error::shape(
            format!("weights of {piece:?}"),
            format!("{} elements, want {total}", flat.len()),
        ));
    }
    let mut parts = Vec::with_capacity(layout.len());
    let mut rest = flat;
    for n in layout {
        let (head, tail) = rest.split_at(n);
        parts.push(head);
        rest = tail;
    }
    piece_from_parts(config, piece, &parts)
}

/// The piece's views from its parts in [`piece_layout`] order, wherever they lie (a flat buffer,
/// or a mapped file: `infer::mapped`); each part's length is checked against the layout.
pub fn piece_from_parts<'a>(config: &GptConfig, piece: Piece, parts: &[&'a [f32]]) -> Result<PieceWeights<'a>> {
    let layout = piece_layout(config, piece);
    let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    if lengths != layout {
        return Err(Error::shape(
            format!("weights of {piece:?}"),
            format!("parts of {lengths:?} elements, want {layout:?}"),
        ));
    }
    Ok(match piece {
        Piece::Attention(_) => PieceWeights::Attention(AttentionWeights {
            ln1_w: parts[0],
            ln1_b: parts[1],
            wqkv: parts[2],
            bqkv: parts[3],
            wo: parts[4],
            bo: parts[5],
            ln2_w: parts[6],
            ln2_b: parts[7],
            wg: parts[8],
        }),
        Piece::Dense(_) | Piece::Expert(..) => PieceWeights::Ffn(ExpertWeights {
            w1: parts[0],
            b1: parts[1],
            w2: parts[2],
            b2: parts[3],
        }),
        Piece::Head => PieceWeights::Head(HeadWeights {
            ln_f_w: parts[0],
            ln_f_b: parts[1],
            lm_head: parts[2],
        }),
    })
}

/// What the decoder reads its weights through.
///
/// The decoder calls [`WeightSource::begin_pass`] before a forward pass, [`WeightSource::route`]
/// once the gate of an MoE block has routed the batch (a streaming source may start loading those
/// experts), [`WeightSource::with_piece`] for each piece in reading order, and
/// [`WeightSource::end_pass`] after the head.
pub trait WeightSource {
    /// The model's configuration (MoE blocks route dropless in generation).
    fn config(&self) -> &GptConfig;

    /// Token embeddings `[V][D]` and position embeddings `[block_size][D]`: small, always resident.
    fn embeddings(&self) -> (&[f32], &[f32]);

    /// A forward pass begins.
    fn begin_pass(&mut self) -> Result<()> {
        Ok(())
    }

    /// A failure that every later pass will meet (a streaming source that cannot read its
    /// checkpoint); `None` (the default) while passes can succeed.
    fn failure(&self) -> Option<String> {
        None
    }

    /// A copy of MoE block `block`'s LN2 and gate weights that is always at hand, for a source
    /// that wants the routing predicted before the block runs ([`WeightSource::prefetch`]);
    /// `None` (the default): no prediction.
    fn router_ahead(&self, block: usize) -> Option<RouterWeights<'_>> {
        let _ = block;
        None
    }

    /// The decoder's guess, made before MoE block `block` runs, of the experts the batch will
    /// route to (increasing): a streaming source may start loading them.
    fn prefetch(&mut self, block: usize, experts: &[usize]) -> Result<()> {
        let _ = (block, experts);
        Ok(())
    }

    /// MoE block `block` routes the batch to `experts` (increasing, without repeats). Returns the
    /// order in which the decoder reads them (a permutation of `experts`: a streaming source puts
    /// those already loaded first). The order never changes the result: each expert's rows land in
    /// their own place, and the combine sums every token's routes in the token's own order.
    fn route(&mut self, block: usize, experts: &[usize]) -> Result<Vec<usize>> {
        let _ = block;
        Ok(experts.to_vec())
    }

    /// Run `f` on the weights of `piece`.
    fn with_piece<R>(&mut self, piece: Piece, f: impl FnOnce(PieceWeights<'_>) -> Result<R>) -> Result<R>;

    /// The forward pass is over.
    fn end_pass(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The whole model in memory.
pub struct ResidentWeights {
    model: Gpt<f32>,
    config: GptConfig,
}

impl ResidentWeights {
    /// Generation from `model` (its MoE blocks route dropless).
    pub fn new(model: Gpt<f32>) -> Self {
        let config = GptConfig {
            dropless: true,
            ..model.config().clone()
        };
        ResidentWeights { model, config }
    }
}

impl WeightSource for ResidentWeights {
    fn config(&self) -> &GptConfig {
        &self.config
    }

    fn embeddings(&self) -> (&[f32], &[f32]) {
        (&self.model.wte, &self.model.wpe)
    }

    fn with_piece<R>(&mut self, piece: Piece, f: impl FnOnce(PieceWeights<'_>) -> Result<R>) -> Result<R> {
        let m = &self.model;
        let missing = || Error::shape("model", format!("{piece:?} is not part of this model"));
        let weights = match piece {
            Piece::Attention(l) => {
                let b = m.blocks.get(l).ok_or_else(missing)?;
                let wg: &[f32] = match &b.ffn {
                    Ffn::Moe(layer) => &layer.params.wg,
                    Ffn::Dense(_) => &[],
                };
                PieceWeights::Attention(AttentionWeights {
                    ln1_w: &b.ln1_w,
                    ln1_b: &b.ln1_b,
                    wqkv: &b.wqkv,
                    bqkv: &b.bqkv,
                    wo: &b.wo,
                    bo: &b.bo,
                    ln2_w: &b.ln2_w,
                    ln2_b: &b.ln2_b,
                    wg,
                })
            }
            Piece::Dense(l) => match m.blocks.get(l).map(|b| &b.ffn) {
                Some(Ffn::Dense(mlp)) => PieceWeights::Ffn(ExpertWeights {
                    w1: &mlp.w1,
                    b1: &mlp.b1,
                    w2: &mlp.w2,
                    b2: &mlp.b2,
                }),
                _ => return Err(missing()),
            },
            Piece::Expert(l, e) => match m.blocks.get(l).map(|b| &b.ffn) {
                Some(Ffn::Moe(layer)) if e < self.config.experts => {
                    PieceWeights::Ffn(layer.params.expert(layer.config(), e))
                }
                _ => return Err(missing()),
            },
            Piece::Head => PieceWeights::Head(HeadWeights {
                ln_f_w: &m.ln_f_w,
                ln_f_b: &m.ln_f_b,
                lm_head: &m.lm_head,
            }),
        };
        f(weights)
    }
}
