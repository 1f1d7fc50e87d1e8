//! Row reductions in eight interleaved partial sums.
//!
//! A plain `fold` over a row is one chain of dependent additions: the compiler may not reorder float
//! additions, so it cannot vectorise the loop, and each addition waits for the previous one (four
//! cycles apiece). Here element `i` goes to partial sum `i % 8` and the eight partial sums are
//! combined in one fixed tree, so the loop vectorises and the result is still a pure function of the
//! row: the same bits on every path, thread count and machine (docs/architecture.md, "The determinism
//! contract").

use super::Scalar;

const LANES: usize = 8;

/// Combine the partial sums and the tail in a fixed order.
#[inline(always)]
fn finish<T: Scalar>(acc: [T; LANES], tail: T) -> T {
    let quads = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    ((quads[0] + quads[2]) + (quads[1] + quads[3])) + tail
}

/// `sum_i x[i]`.
#[inline]
pub fn sum<T: Scalar>(x: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(T::ZERO, |a, &v| a + v);
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    finish(acc, tail)
}

/// `sum_i a[i] * b[i]` over the shorter of the two.
#[inline]
pub fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::ZERO, |s, (&u, &v)| s + u * v);
    for (u, v) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += u[l] * v[l];
        }
    }
    finish(acc, tail)
}

/// `sum_i (x[i] - mean)^2`.
#[inline]
pub fn sum_sq_dev<T: Scalar>(x: &[T], mean: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::ZERO, |a, &v| a + (v - mean) * (v - mean));
    for c in chunks {
        for l in 0..LANES {
            let dv = c[l] - mean;
            acc[l] += dv * dv;
        }
    }
    finish(acc, tail)
}

/// `max_i x[i]` by [`Scalar::max`]; `x` must not be empty. For numbers the maximum does not depend
/// on the order, so this only removes the chain of dependent compares.
#[inline]
pub fn max<T: Scalar>(x: &[T]) -> T {
    let mut acc = [x[0]; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(x[0], |m, &v| m.max(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_agree_with_f64_sums_for_every_tail_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want_sum: f64 = a.iter().map(|&v| v as f64).sum();
            let want_dot: f64 = a.iter().zip(&b).map(|(&u, &v)| u as f64 * v as f64).sum();
            let mean = (want_sum / n.max(1) as f64) as f32;
            let want_dev: f64 = a.iter().map(|&v| ((v - mean) as f64).powi(2)).sum();
            assert!((sum(&a) as f64 - want_sum).abs() < 1e-5, "sum of {n}");
            assert!((dot(&a, &b) as f64 - want_dot).abs() < 1e-5, "dot of {n}");
            assert!(
                (sum_sq_dev(&a, mean) as f64 - want_dev).abs() < 1e-5,
                "deviation of {n}"
            );
        }
    }

    #[test]
    fn max_finds_the_largest_wherever_it_is() {
        for n in 1..30 {
            for at in 0..n {
                let mut x: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
                x[at] = 5.0;
                assert_eq!(max(&x), 5.0, "n {n}, at {at}");
            }
        }
    }

    #[test]
    fn the_order_is_the_fixed_tree() {
        // Values whose sum depends on the order of the additions in f32.
        let x = [1e8f32, 1.0, -1e8, 1.0, 3.0, 0.5, 0.25, 7.0, 2.0];
        let lanes = [1e8f32 + 3.0, 1.0 + 0.5, -1e8 + 0.25, 1.0 + 7.0];
        let want = ((lanes[0] + lanes[2]) + (lanes[1] + lanes[3])) + 2.0;
        assert_eq!(sum(&x), want);
    }
}
