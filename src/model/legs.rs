//! The legs of a training pass, and which dense parameters each leg reads.
//!
//! A [`GroupPass`](super::pass::GroupPass) stops at every MoE block on the way forward and again on
//! the way back; between two stops it runs a *leg* of dense work. When dense parameters are sharded
//! across workers (ZeRO-3 style), a worker gathers each leg's parameters from their owners just
//! before the leg and the next leg's while this one computes: the horizontal half of SE-MoE's 2D
//! prefetch. This module says what each leg needs, so that the gather fetches exactly that.

use super::gpt::{is_expert_tensor, Ffn, Gpt, GptConfig};
use crate::error::{Error, Result};
use crate::kernels::Scalar;

/// A group of dense tensors that a pass reads together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    /// Token and position embeddings (the forward reads them; their backward only writes gradients).
    Embeddings,
    /// Block `l`'s dense tensors: its layer norms, attention, and its dense FFN or MoE gate weights.
    Block(usize),
    /// The final layer norm and the LM head.
    Head,
}

impl Section {
    /// The section of a dense tensor, from its name (`None` for expert tensors and unknown names).
    pub fn of_tensor(name: &str) -> Option<Section> {
        if is_expert_tensor(name) {
            return None;
        }
        match name {
            "wte" | "wpe" => Some(Section::Embeddings),
            "ln_f.weight" | "ln_f.bias" | "lm_head" => Some(Section::Head),
            other => other
                .strip_prefix("h.")?
                .split('.')
                .next()?
                .parse()
                .ok()
                .map(Section::Block),
        }
    }
}

/// The legs of a training pass in the order a pass runs them, each as the sections it reads.
///
/// With MoE blocks `m0 < m1 < ... < mk`: the forward legs end at each MoE block (the first starts
/// with the embeddings); the turn runs the blocks after `mk`, the head, the loss and back; the
/// backward legs start at each MoE block's input gradient and run down to the next MoE block below
/// (the last one to the embeddings, whose backward reads no parameter). A model without MoE blocks
/// has one leg that reads everything.
pub fn training_legs(config: &GptConfig) -> Vec<Vec<Section>> {
    let moe: Vec<usize> = (0..config.n_layer).filter(|&l| config.is_moe(l)).collect();
    let mut legs = Vec::with_capacity(2 * moe.len() + 1);
    let mut next = 0;
    for &b in &moe {
        let mut leg = Vec::new();
        if next == 0 {
            leg.push(Section::Embeddings);
        }
        leg.extend((next..=b).map(Section::Block));
        legs.push(leg);
        next = b + 1;
    }
    let mut turn = Vec::new();
    if moe.is_empty() {
        turn.push(Section::Embeddings);
    }
    turn.extend((next..config.n_layer).map(Section::Block));
    turn.push(Section::Head);
    legs.push(turn);
    for (i, &b) in moe.iter().enumerate().rev() {
        let low = if i == 0 { 0 } else { moe[i - 1] + 1 };
        legs.push((low..=b).rev().map(Section::Block).collect());
    }
    legs
}

/// Indices (in [`Gpt::tensors`] order) of the dense tensors each section in `sections` holds, ascending.
pub fn section_tensors<T: Scalar>(model: &Gpt<T>, sections: &[Section]) -> Vec<usize> {
    model
        .tensors()
        .iter()
        .enumerate()
        .filter(|(_, (name, _, _))| Section::of_tensor(name).is_some_and(|s| sections.contains(&s)))
        .map(|(i, _)| i)
        .collect()
}

/// Check that `model` holds every tensor of `section` at full length: a pass given a leg's parameters
/// fails here, naming the tensor, rather than computing with a missing one. (Reads lengths only;
/// names are built for the error alone, since a pass calls this at every block.)
pub fn check_section<T: Scalar>(model: &Gpt<T>, section: Section) -> Result<()> {
    let c = model.config();
    let (d, v) = (c.d_model, c.vocab);
    let check = |name: &dyn Fn() -> String, buf: &[T], want: usize| -> Result<()> {
        if buf.len() == want {
            return Ok(());
        }
        Err(Error::shape(
            format!("parameters of {section:?}"),
            format!(
                "tensor {} holds {} values, expected {want} (not gathered?)",
                name(),
                buf.len()
            ),
        ))
    };
    match section {
        Section::Embeddings => {
            check(&|| "wte".into(), &model.wte, v * d)?;
            check(&|| "wpe".into(), &model.wpe, c.block_size * d)
        }
        Section::Head => {
            check(&|| "ln_f.weight".into(), &model.ln_f_w, d)?;
            check(&|| "ln_f.bias".into(), &model.ln_f_b, d)?;
            check(&|| "lm_head".into(), &model.lm_head, d * v)
        }
        Section::Block(l) => {
            let b = model
                .blocks
                .get(l)
                .ok_or_else(|| Error::shape("parameters", format!("the model has no block {l}")))?;
            let name = |s: &'static str| move || format!("h.{l}.{s}");
            check(&name("ln1.weight"), &b.ln1_w, d)?;
            check(&name("ln1.bias"), &b.ln1_b, d)?;
            check(&name("attn.wqkv"), &b.wqkv, d * 3 * d)?;
            check(&name("attn.bqkv"), &b.bqkv, 3 * d)?;
            check(&name("attn.wo"), &b.wo, d * d)?;
            check(&name("attn.bo"), &b.bo, d)?;
            check(&name("ln2.weight"), &b.ln2_w, d)?;
            check(&name("ln2.bias"), &b.ln2_b, d)?;
            match &b.ffn {
                Ffn::Dense(m) => {
                    let f = c.dense_width();
                    check(&name("mlp.w1"), &m.w1, d * f)?;
                    check(&name("mlp.b1"), &m.b1, f)?;
                    check(&name("mlp.w2"), &m.w2, f * d)?;
                    check(&name("mlp.b2"), &m.b2, d)
                }
                Ffn::Moe(layer) => check(&name("moe.wg"), &layer.params.wg, d * c.experts),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::GptConfig;

    fn config(n_layer: usize, moe_every: usize) -> GptConfig {
        GptConfig {
            n_layer,
            moe_every,
            d_model: 8,
            n_head: 2,
            d_ff: 8,
            experts: 4,
            block_size: 4,
            ..GptConfig::default()
        }
    }

    #[test]
    fn every_block_moe_gives_one_leg_per_stop() {
        use Section::*;
        let legs = training_legs(&config(3, 1));
        assert_eq!(
            legs,
            vec![
                vec![Embeddings, Block(0)],
                vec![Block(1)],
                vec![Block(2)],
                vec![Head],
                vec![Block(2)],
                vec![Block(1)],
                vec![Block(0)],
            ]
        );
    }

    #[test]
    fn dense_blocks_join_the_leg_that_runs_them() {
        use Section::*;
        // moe_every 2: blocks 1 and 3 are MoE, 0, 2 and 4 dense.
        let legs = training_legs(&config(5, 2));
        assert_eq!(
            legs,
            vec![
                vec![Embeddings, Block(0), Block(1)],
                vec![Block(2), Block(3)],
                vec![Block(4), Head],
                vec![Block(3), Block(2)],
                vec![Block(1), Block(0)],
            ]
        );
        assert_eq!(
            training_legs(&config(2, 0)),
            vec![vec![Embeddings, Block(0), Block(1), Head]]
        );
    }

    #[test]
    fn every_dense_tensor_has_a_section_and_expert_tensors_none() {
        let model = Gpt::<f32>::init(&config(4, 2), 1).unwrap();
        for (name, _, _) in model.tensors() {
            assert_eq!(Section::of_tensor(&name).is_none(), is_expert_tensor(&name), "{name}");
        }
        let all = [
            Section::Embeddings,
            Section::Block(0),
            Section::Block(1),
            Section::Block(2),
            Section::Block(3),
            Section::Head,
        ];
        let dense = model.tensors().iter().filter(|(n, _, _)| !is_expert_tensor(n)).count();
        assert_eq!(section_tensors(&model, &all).len(), dense);
        assert_eq!(Section::of_tensor("h.3.moe.wg"), Some(Section::Block(3)));
        assert_eq!(Section::of_tensor("h.12.attn.wqkv"), Some(Section::Block(12)));
    }

    #[test]
    fn a_full_model_holds_every_stage() {
        for (layers, every) in [(4, 2), (3, 1), (2, 0)] {
            let model = Gpt::<f32>::init(&config(layers, every), 1).unwrap();
            for sections in training_legs(model.config()) {
                for section in sections {
                    check_section(&model, section).unwrap();
                }
            }
        }
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let mut model = Gpt::<f32>::init(&config(2, 1), 1).unwrap();
        model.blocks[1].wo = Vec::new();
        assert!(check_section(&model, Section::Block(0)).is_ok());
        let e = check_section(&model, Section::Block(1)).unwrap_err().to_string();
        assert!(e.contains("h.1.attn.wo"), "{e}");
        model.lm_head.pop();
        let e = check_section(&model, Section::Head).unwrap_err().to_string();
        assert!(e.contains("lm_head"), "{e}");
    }
}
