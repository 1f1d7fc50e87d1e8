//! Routing: top-k selection, capacity and drop policy, and the index tables that dispatch and combine
//! use. Pure integer bookkeeping over the gate probabilities; no tensor data moves here.
//!
//! An *assignment* is a (choice `j`, token `s`) pair, numbered `a = j * S + s`. Kept assignments are
//! laid out in one concatenated expert batch: expert 0's rows first, then expert 1's, and within an
//! expert in (choice, token) order. That order is canonical: it depends only on the routing, never on
//! where the expert runs, which is what makes expert matmuls reproducible (docs/architecture.md,
//! "The determinism contract").

use super::{DropPolicy, MoeConfig};
use crate::error::{Error, Result};
use crate::kernels::{Scalar, SKIP};

/// The routing of one group of tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub k: usize,
    /// Tokens in the group.
    pub tokens: usize,
    /// Number of experts.
    pub experts: usize,
    /// Capacity per expert (`None`: dropless).
    pub capacity: Option<usize>,
    /// `expert[j * S + s]`: the expert of token `s`'s choice `j`.
    pub expert: Vec<u32>,
    /// `keep[a]`: whether assignment `a` got a slot.
    pub keep: Vec<bool>,
    /// `loc[a]`: the assignment's slot in its expert. Position policy: its place in (choice, token)
    /// order, also for dropped assignments (then `>= capacity`); probs policy: the slot of a kept
    /// assignment, -1 for a dropped one.
    pub loc: Vec<i64>,
    /// `row[a]`: the assignment's row in the concatenated expert batch, or [`SKIP`] if dropped.
    pub row: Vec<u32>,
    /// `offsets[e]..offsets[e+1]`: expert `e`'s rows in the concatenated batch.
    pub offsets: Vec<usize>,
    /// `row_token[r]`: the token of batch row `r`.
    pub row_token: Vec<u32>,
    /// `row_assignment[r]`: the assignment of batch row `r`.
    pub row_assignment: Vec<u32>,
    /// Tokens whose first choice is expert `e`, before dropping (the auxiliary loss uses this).
    pub first_choice_counts: Vec<usize>,
}

impl Routing {
    /// Route `tokens` tokens given their gate probabilities `gates` (`[S][E]`, row-major).
    pub fn new<T: Scalar>(config: &MoeConfig, gates: &[T], tokens: usize) -> Result<Self> {
        let (k, e_count) = (config.k, config.experts);
        if gates.len() != tokens * e_count {
            return Err(Error::shape(
                "routing",
                format!("gates must be {tokens}x{e_count}, got {} elements", gates.len()),
            ));
        }
        if tokens > (u32::MAX as usize) / (k + 1) {
            return Err(Error::config(format!("too many tokens in one group: {tokens}")));
        }
        // A NaN would lose every comparison (its token routed to expert 0, whatever the others).
        if let Some(i) = gates.iter().position(|g| !g.to_f64().is_finite()) {
            return Err(Error::NonFinite {
                context: "routing".into(),
                detail: format!("gate probability of token {} and expert {}", i / e_count, i % e_count),
            });
        }
        let n = k * tokens;
        let mut expert = vec![0u32; n];
        for s in 0..tokens {
            let row = &gates[s * e_count..(s + 1) * e_count];
            for j in 0..k {
                let taken = |e: usize| (0..j).any(|i| expert[i * tokens + s] as usize == e);
                let mut best: Option<usize> = None;
                for (e, &g) in row.iter().enumerate() {
                    if taken(e) {
                        continue;
                    }
                    // Strictly greater: ties go to the lowest expert index, like torch.argmax.
                    if best.is_none_or(|b| g > row[b]) {
                        best = Some(e);
                    }
                }
                // k <= E was validated, so an untaken expert always exists.
                expert[j * tokens + s] = best.unwrap_or(0) as u32;
            }
        }

        let capacity = config.capacity(tokens);
        let mut first_choice_counts = vec![0usize; e_count];
        for &e in &expert[..tokens] {
            first_choice_counts[e as usize] += 1;
        }

        // Place every assignment in (choice, token) order within its expert.
        let mut order_in_expert = vec![0usize; n];
        let mut per_expert = vec![0usize; e_count];
        for a in 0..n {
            let e = expert[a] as usize;
            order_in_expert[a] = per_expert[e];
            per_expert[e] += 1;
        }

        let (keep, loc): (Vec<bool>, Vec<i64>) = match (capacity, config.drop_policy) {
            (None, _) => (vec![true; n], order_in_expert.iter().map(|&p| p as i64).collect()),
            (Some(c), DropPolicy::Position) => (
                order_in_expert.iter().map(|&p| p < c).collect(),
                order_in_expert.iter().map(|&p| p as i64).collect(),
            ),
            (Some(c), DropPolicy::Probs) => keep_most_probable(&expert, gates, tokens, e_count, c),
        };

        // Concatenated batch layout.
        let mut kept_per_expert = vec![0usize; e_count];
        for a in 0..n {
            if keep[a] {
                kept_per_expert[expert[a] as usize] += 1;
            }
        }
        let mut offsets = vec![0usize; e_count + 1];
        for e in 0..e_count {
            offsets[e + 1] = offsets[e] + kept_per_expert[e];
        }
        let total = offsets[e_count];
        let mut row = vec![SKIP; n];
        let mut row_token = vec![0u32; total];
        let mut row_assignment = vec![0u32; total];
        for a in 0..n {
            if keep[a] {
                let r = offsets[expert[a] as usize] + loc[a] as usize;
                row[a] = r as u32;
                row_token[r] = (a % tokens) as u32;
                row_assignment[r] = a as u32;
            }
        }
        Ok(Routing {
            k,
            tokens,
            experts: e_count,
            capacity,
            expert,
            keep,
            loc,
            row,
            offsets,
            row_token,
            row_assignment,
            first_choice_counts,
        })
    }

    /// Kept assignments per expert.
    pub fn expert_counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Assignments that found no slot.
    pub fn dropped(&self) -> usize {
        self.keep.iter().filter(|&&k| !k).count()
    }

    /// Rows of the concatenated expert batch (kept assignments).
    pub fn kept(&self) -> usize {
        self.offsets[self.experts]
    }

    /// Batch rows in token-major order (`[S][k]`, [`SKIP`] for dropped), for the combine.
    pub fn token_major_rows(&self) -> Vec<u32> {
        let mut out = vec![SKIP; self.tokens * self.k];
        for j in 0..self.k {
            for s in 0..self.tokens {
                out[s * self.k + j] = self.row[j * self.tokens + s];
            }
        }
        out
    }
}

/// The probs drop policy: each expert keeps the `capacity` assignments with the highest gate value
/// (ties: lower choice, then lower token); kept ones get slots in (choice, token) order.
fn keep_most_probable<T: Scalar>(
    expert: &[u32],
    gates: &[T],
    tokens: usize,
    e_count: usize,
    capacity: usize,
) -> (Vec<bool>, Vec<i64>) {
    let n = expert.len();
    let mut by_expert: Vec<Vec<usize>> = vec![Vec::new(); e_count];
    for a in 0..n {
        by_expert[expert[a] as usize].push(a); // (choice, token) order, since a = j * S + s
    }
    let mut keep = vec![false; n];
    let mut loc = vec![-1i64; n];
    for (e, list) in by_expert.iter_mut().enumerate() {
        if list.len() > capacity {
            let gate = |a: usize| gates[(a % tokens) * e_count + e];
            // Stable sort by descending gate keeps (choice, token) order among equal gates.
            // (The gates are finite, checked above: `partial_cmp` is a total order on them.)
            list.sort_by(|&x, &y| gate(y).partial_cmp(&gate(x)).unwrap_or(std::cmp::Ordering::Equal));
            list.truncate(capacity);
            list.sort_unstable();
        }
        for (slot, &a) in list.iter().enumerate() {
            keep[a] = true;
            loc[a] = slot as i64;
        }
    }
    (keep, loc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(k: usize, e: usize, cf: f64) -> MoeConfig {
        MoeConfig {
            d_model: 4,
            d_ff: 4,
            experts: e,
            k,
            capacity_factor: cf,
            min_capacity: 0,
            ..MoeConfig::default()
        }
    }

    #[test]
    fn first_choices_fill_slots_before_second_choices() -> Result<()> {
        // 4 tokens, 2 experts; every token prefers expert 0. Capacity = ceil(2 * 0.5 * 4 / 2) = 2.
        let gates = [0.9f64, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4];
        let r = Routing::new(&config(2, 2, 0.5), &gates, 4)?;
        assert_eq!(r.capacity, Some(2));
        assert_eq!(r.expert, [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(r.keep, [true, true, false, false, true, true, false, false]);
        assert_eq!(r.loc, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(r.expert_counts(), [2, 2]);
        assert_eq!(r.dropped(), 4);
        assert_eq!(r.row_token, [0, 1, 0, 1]);
        Ok(())
    }

    #[test]
    fn a_gate_that_is_not_finite_is_refused_not_routed_to_expert_0() {
        let gates = [0.9f64, 0.1, f64::NAN, 0.2];
        let Err(e) = Routing::new(&config(1, 2, 2.0), &gates, 2) else {
            panic!("a NaN gate was routed");
        };
        let e = e.to_string();
        assert!(e.contains("token 1 and expert 0"), "{e}");
    }

    #[test]
    fn probs_policy_keeps_the_most_confident() -> Result<()> {
        let gates = [0.6f64, 0.4, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2];
        let c = MoeConfig {
            drop_policy: DropPolicy::Probs,
            ..config(1, 2, 1.0)
        };
        // capacity = ceil(1 * 4 / 2) = 2; expert 0 is wanted by all four, keeps tokens 1 and 3.
        let r = Routing::new(&c, &gates, 4)?;
        assert_eq!(r.keep, [false, true, false, true]);
        assert_eq!(r.loc, [-1, 0, -1, 1]);
        Ok(())
    }

    #[test]
    fn ties_go_to_the_lowest_expert() -> Result<()> {
        let gates = [0.25f64; 4];
        let r = Routing::new(&config(3, 4, 4.0), &gates, 1)?;
        assert_eq!(r.expert, [0, 1, 2]);
        Ok(())
    }
}
