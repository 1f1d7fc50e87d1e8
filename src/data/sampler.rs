//! The deterministic sampler: which windows of the text a step trains on is a pure function of
//! (seed, step, group), so any worker can compute any group's batch, a resumed run sees exactly the
//! batches it would have seen, and no sampler state needs saving.

use rand::{Rng, SeedableRng};

/// SplitMix64 finaliser: mixes (seed, step, group) into one well-spread RNG seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Start offsets of the `seqs` training windows (each `t + 1` bytes: inputs and shifted targets) of
/// group `group` at step `step`.
pub fn window_starts(seed: u64, step: u64, group: u64, seqs: usize, text_len: usize, t: usize) -> Vec<usize> {
    let span = text_len.saturating_sub(t + 1) + 1;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ step) ^ group));
    (0..seqs).map(|_| rng.random_range(0..span)).collect()
}

/// The inputs and targets of group `group` at step `step`: `seqs` windows of `t` bytes, drawn by
/// [`window_starts`]. The plain loop and every worker build a group's batch with this one call.
pub fn group_batch(text: &[u8], seed: u64, step: u64, group: usize, seqs: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let starts = window_starts(seed, step, group as u64, seqs, text.len(), t);
    windows(text, &starts, t)
}

/// Evenly spaced evaluation windows over a text: `count` windows of `t + 1` bytes.
pub fn eval_starts(text_len: usize, t: usize, count: usize) -> Vec<usize> {
    let span = text_len.saturating_sub(t + 1);
    (0..count)
        .map(|i| if count <= 1 { 0 } else { i * span / (count - 1) })
        .collect()
}

/// Inputs and targets of windows starting at `starts`.
pub fn windows(text: &[u8], starts: &[usize], t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut idx = Vec::with_capacity(starts.len() * t);
    let mut targets = Vec::with_capacity(starts.len() * t);
    for &s in starts {
        idx.extend(text[s..s + t].iter().map(|&b| b as u32));
        targets.extend(text[s + 1..s + t + 1].iter().map(|&b| b as u32));
    }
    (idx, targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pure_function_of_seed_step_group() {
        let a = window_starts(1, 10, 2, 8, 10_000, 64);
        assert_eq!(a, window_starts(1, 10, 2, 8, 10_000, 64));
        assert_ne!(a, window_starts(1, 11, 2, 8, 10_000, 64));
        assert_ne!(a, window_starts(1, 10, 3, 8, 10_000, 64));
        assert_ne!(a, window_starts(2, 10, 2, 8, 10_000, 64));
        assert!(a.iter().all(|&s| s + 65 <= 10_000));
    }

    #[test]
    fn windows_cover_the_whole_text_uniformly_enough() {
        let mut seen = [0usize; 10];
        for step in 0..2000 {
            for s in window_starts(7, step, 0, 4, 1_001, 0) {
                seen[s / 101] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c > 600 && c < 1000), "{seen:?}");
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let text = b"abcdefgh";
        let (idx, tg) = windows(text, &[0, 3], 3);
        assert_eq!(idx, [97, 98, 99, 100, 101, 102]);
        assert_eq!(tg, [98, 99, 100, 101, 102, 103]);
        assert_eq!(eval_starts(100, 9, 3), [0, 45, 90]);
    }
}
