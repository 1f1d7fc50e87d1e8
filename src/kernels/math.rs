//! Vectorisable f32 element-wise math: `exp`, `erf`, and the GELU forms and derivatives built on them.
//!
//! The standard library's `exp` and the `libm` `erf` are scalar calls that the compiler cannot
//! vectorise, and GELU runs on every expert activation (tens of millions of elements per step). These
//! versions are branch-free polynomial and rational approximations (error a few ulp), written so that
//! LLVM turns each loop into AVX-512 or AVX2 code. The loops are compiled three times (AVX-512, AVX2,
//! portable) and chosen once at run time. No multiply-add is contracted into an FMA, so the three
//! versions give identical bits.

/// exp(x) for f32, Cephes-style: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, then
/// scaled by 2^n through the exponent bits. Inputs above 88 are clamped (e^88 is finite); below
/// -87 (where e^x leaves the normal range) the result is 0, so that e^-inf is 0 as a masked
/// softmax needs, not e^-87. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let underflows = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // A select, not a branch: the loops stay vectorised.
    if underflows {
        0.0
    } else {
        y * pow2i(n)
    }
}

/// 2^n for an integral `n` in [-126, 127], built in the exponent bits without a float-to-int
/// conversion: `n + 127 + 2^23` holds `n + 127` in its low mantissa bits, and shifting left by 23
/// moves them into the exponent field. (`n as i32` saturates on out-of-range values, which LLVM
/// cannot vectorise: it turned every exp into eight scalar conversions with compares.)
#[inline(always)]
fn pow2i(n: f32) -> f32 {
    const BIASED_SHIFT: f32 = 127.0 + 8_388_608.0;
    f32::from_bits((n + BIASED_SHIFT).to_bits() << 23)
}

/// erf(x) for f32: x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in f32 beyond), the rational form used
/// by Eigen and XLA.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_3e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// sqrt(2 / pi)
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_C: f32 = 0.044_715;

/// tanh(u) = 1 - 2 / (exp(2u) + 1); saturates cleanly thanks to the clamped exp.
#[inline(always)]
fn tanh_f32(u: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * u) + 1.0)
}

#[inline(always)]
fn gelu_erf_fwd(h: &[f32], a: &mut [f32]) {
    for (a, &x) in a.iter_mut().zip(h) {
        *a = 0.5 * x * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn gelu_erf_bwd(h: &[f32], g: &mut [f32]) {
    for (g, &x) in g.iter_mut().zip(h) {
        let cdf = 0.5 * (1.0 + erf_f32(x * FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp_f32(-0.5 * x * x);
        *g *= cdf + x * pdf;
    }
}

#[inline(always)]
fn gelu_tanh_fwd(h: &[f32], a: &mut [f32]) {
    for (a, &x) in a.iter_mut().zip(h) {
        let u = SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x);
        *a = 0.5 * x * (1.0 + tanh_f32(u));
    }
}

#[inline(always)]
fn gelu_tanh_bwd(h: &[f32], g: &mut [f32]) {
    for (g, &x) in g.iter_mut().zip(h) {
        let u = SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x);
        let t = tanh_f32(u);
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x);
        *g *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
    }
}

#[inline(always)]
fn exp_affine_in_place(x: &mut [f32], scale: f32, shift: f32) {
    for v in x.iter_mut() {
        *v = exp_f32(*v * scale - shift);
    }
}

/// The scalars of one AdamW step for one tensor (see `train::optimizer::AdamW::apply`).
#[derive(Clone, Copy, Debug)]
pub struct AdamwStep {
    /// Decoupled weight decay factor applied to the parameter first (1 without decay).
    pub keep: f32,
    /// beta1.
    pub b1: f32,
    /// beta2.
    pub b2: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// Epsilon.
    pub eps: f32,
}

#[inline(always)]
fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamwStep) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for j in 0..n {
        let gj = g[j];
        p[j] *= s.keep;
        m[j] += (1.0 - s.b1) * (gj - m[j]);
        v[j] = v[j] * s.b2 + (1.0 - s.b2) * gj * gj;
        let denom = v[j].sqrt() / s.bc2_sqrt + s.eps;
        p[j] += -s.step_size * (m[j] / denom);
    }
}

/// The instruction sets the element-wise kernels are compiled for, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Any CPU (named only by the tests: the others fall back to it).
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (F, VL) with AVX2 and FMA.
    Avx512,
}

impl Isa {
    /// Whether this CPU runs the version compiled for `self` (every feature it is compiled for).
    #[allow(clippy::needless_return)]
    pub(crate) fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            return match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::Avx512 => {
                    avx2 && std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                }
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        return self == Isa::Portable;
    }
}

/// Instantiate an element-wise kernel for AVX-512, AVX2 and portable code: `$name` runs the best
/// version this CPU runs, `$at(top, ..)` the best one up to `top` (tests compare them all).
macro_rules! multiversion {
    ($(#[$doc:meta])* $name:ident, $at:ident => $body:ident ( $($arg:ident : $ty:ty),* )) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) {
            $at(Isa::Avx512, $($arg),*)
        }

        /// The version of
        #[doc = concat!("[`", stringify!($name), "`]")]
        /// for the best instruction set up to `top` that this CPU runs.
        fn $at(top: Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { $body($($arg),*) }
                // (Where avx512f is present without one of the others, the next version runs
                // instead: the results are the same, since the kernels are element-wise and
                // contract no multiply-adds.)
                if top >= Isa::Avx512 && Isa::Avx512.runs_here() {
                    // SAFETY: `v4` is compiled for avx512f, avx512vl, avx2 and fma, and the CPU
                    // running this has each of them (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if top >= Isa::Avx2 && Isa::Avx2.runs_here() {
                    // SAFETY: `v3` is compiled for avx2 and fma, and the CPU running this has both
                    // (checked just above).
                    return unsafe { v3($($arg),*) };
                }
            }
            let _ = top;
            $body($($arg),*)
        }
    };
}

multiversion!(
    /// `a = gelu_erf(h)`.
    gelu_erf_forward, gelu_erf_forward_at => gelu_erf_fwd(h: &[f32], a: &mut [f32])
);
multiversion!(
    /// `g *= gelu_erf'(h)`.
    gelu_erf_backward, gelu_erf_backward_at => gelu_erf_bwd(h: &[f32], g: &mut [f32])
);
multiversion!(
    /// `a = gelu_tanh(h)`.
    gelu_tanh_forward, gelu_tanh_forward_at => gelu_tanh_fwd(h: &[f32], a: &mut [f32])
);
multiversion!(
    /// `g *= gelu_tanh'(h)`.
    gelu_tanh_backward, gelu_tanh_backward_at => gelu_tanh_bwd(h: &[f32], g: &mut [f32])
);
multiversion!(
    /// `x = exp(x * scale - shift)` element-wise (the numerators of a softmax).
    exp_affine, exp_affine_at => exp_affine_in_place(x: &mut [f32], scale: f32, shift: f32)
);

multiversion!(
    /// One AdamW step over a chunk of a tensor: `p`, `m`, `v` updated in place from `g` (all of
    /// `p`'s length). Element-wise with no contracted multiply-adds, so every instruction set
    /// gives the same bits.
    adamw_update, adamw_update_at => adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamwStep)
);

/// Bytes of output rows one pass of [`rows_times`] keeps hot in L1 (the weights stream past them).
const ROWS_TIMES_TILE_BYTES: usize = 32 * 1024;

/// `out[r] += x[r] @ w` for every row `r` of `x` (`[rows][k]`), `w` `[k][n]` row-major, `out`
/// `[rows][n]`. Each output element is `out + x[r][0] w[0][j] + x[r][1] w[1][j] + ...` as a chain
/// of fused multiply-adds in the order of `k`: a row's result never depends on the other rows, the
/// column tiling or the instruction set, which is what makes batched decoding give every sequence the
/// bits it gets alone (src/infer/). One row (decoding a single sequence) streams `w` from start to
/// end; more rows take the columns in tiles whose outputs stay in L1 while `w` streams past.
#[inline(always)]
fn rows_times_body(x: &[f32], w: &[f32], k: usize, n: usize, out: &mut [f32]) {
    let rows = out.len() / n.max(1);
    let tile = (ROWS_TIMES_TILE_BYTES / 4 / rows.max(1))
        .next_multiple_of(16)
        .clamp(64, n.max(64));
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + tile).min(n);
        let width = j1 - j0;
        let mut kk = 0;
        while kk + 8 <= k {
            let wr = |i: usize| &w[(kk + i) * n + j0..][..width];
            let (w0, w1, w2, w3, w4, w5, w6, w7) = (wr(0), wr(1), wr(2), wr(3), wr(4), wr(5), wr(6), wr(7));
            for r in 0..rows {
                let a = &x[r * k + kk..][..8];
                let o = &mut out[r * n + j0..][..width];
                for j in 0..width {
                    let mut acc = a[0].mul_add(w0[j], o[j]);
                    acc = a[1].mul_add(w1[j], acc);
                    acc = a[2].mul_add(w2[j], acc);
                    acc = a[3].mul_add(w3[j], acc);
                    acc = a[4].mul_add(w4[j], acc);
                    acc = a[5].mul_add(w5[j], acc);
                    acc = a[6].mul_add(w6[j], acc);
                    o[j] = a[7].mul_add(w7[j], acc);
                }
            }
            kk += 8;
        }
        while kk < k {
            let w0 = &w[kk * n + j0..][..width];
            for r in 0..rows {
                let a0 = x[r * k + kk];
                let o = &mut out[r * n + j0..][..width];
                for j in 0..width {
                    o[j] = a0.mul_add(w0[j], o[j]);
                }
            }
            kk += 1;
        }
        j0 = j1;
    }
}

multiversion!(
    /// See [`rows_times_body`]: `out[r] += x[r] @ w`, row-independent bits. (`mul_add` is exact
    /// rounding everywhere, so every version gives the same bits; the portable one is slow.)
    rows_times_unchecked, rows_times_unchecked_at => rows_times_body(x: &[f32], w: &[f32], k: usize, n: usize, out: &mut [f32])
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_times_rows_do_not_depend_on_each_other_or_the_instruction_set() {
        let (k, n) = (77, 300);
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        for rows in [1, 3, 16, 40] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 104729) % 997) as f32 * 1e-3 - 0.4)
                .collect();
            let mut together = vec![0.25f32; rows * n];
            rows_times_unchecked(&x, &w, k, n, &mut together);
            let mut portable = vec![0.25f32; rows * n];
            rows_times_body(&x, &w, k, n, &mut portable);
            assert!(
                together.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rows} rows: the dispatched version differs from the portable one"
            );
            for r in 0..rows {
                let mut alone = vec![0.25f32; n];
                rows_times_unchecked(&x[r * k..(r + 1) * k], &w, k, n, &mut alone);
                assert!(
                    alone
                        .iter()
                        .zip(&together[r * n..])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "row {r} of {rows} differs when computed alone"
                );
                for j in [0, 1, n / 2, n - 1] {
                    let want = 0.25 + (0..k).map(|i| x[r * k + i] as f64 * w[i * n + j] as f64).sum::<f64>();
                    let got = together[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "[{r}][{j}] {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            assert!(((got - want) / want).abs() < 4e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
    }

    #[test]
    fn exp_of_minus_infinity_and_below_the_normal_range_is_zero() {
        let mut v = [f32::NEG_INFINITY, -200.0, -87.5, -87.0, f32::NAN, f32::INFINITY];
        exp_affine_in_place(&mut v, 1.0, 0.0);
        assert_eq!(&v[..3], [0.0, 0.0, 0.0]);
        assert!(
            v[3] > 0.0 && ((v[3] as f64 - (-87f64).exp()) / (-87f64).exp()).abs() < 4e-7,
            "{}",
            v[3]
        );
        assert!(v[4].is_nan(), "NaN stays NaN");
        assert!(v[5].is_finite() && v[5] > 1e38, "{}", v[5]);
    }

    #[test]
    fn pow2i_matches_the_exponent_field() {
        for n in -126..=127 {
            assert_eq!(pow2i(n as f32), 2f32.powi(n), "2^{n}");
        }
    }

    #[test]
    fn erf_matches_libm_to_a_few_ulp() {
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm::erf(x as f64);
            let got = erf_f32(x) as f64;
            let tol = 4e-7 * want.abs().max(1e-3);
            assert!((got - want).abs() < tol, "erf({x}) = {got}, want {want}");
            x += 0.00371;
        }
    }

    #[test]
    fn every_instruction_set_gives_the_portable_bits() {
        let same =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let h: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let ones = vec![1.0f32; h.len()];
        let step = AdamwStep {
            keep: 0.999,
            b1: 0.9,
            b2: 0.95,
            bc2_sqrt: 0.3,
            step_size: 1e-3,
            eps: 1e-8,
        };
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect();
        eprintln!("instruction sets compared with the portable code: {isas:?}");
        for &isa in &isas {
            let two = |f: &dyn Fn(&mut Vec<f32>), g: &dyn Fn(&mut Vec<f32>), start: &[f32], what: &str| {
                let (mut a, mut b) = (start.to_vec(), start.to_vec());
                f(&mut a);
                g(&mut b);
                assert!(same(&a, &b), "{what} on {isa:?} differs from the portable code");
            };
            two(
                &|a| gelu_erf_forward_at(isa, &h, a),
                &|b| gelu_erf_fwd(&h, b),
                &ones,
                "gelu_erf_forward",
            );
            two(
                &|a| gelu_erf_backward_at(isa, &h, a),
                &|b| gelu_erf_bwd(&h, b),
                &ones,
                "gelu_erf_backward",
            );
            two(
                &|a| gelu_tanh_forward_at(isa, &h, a),
                &|b| gelu_tanh_fwd(&h, b),
                &ones,
                "gelu_tanh_forward",
            );
            two(
                &|a| gelu_tanh_backward_at(isa, &h, a),
                &|b| gelu_tanh_bwd(&h, b),
                &ones,
                "gelu_tanh_backward",
            );
            two(
                &|a| exp_affine_at(isa, a, 0.7, 1.5),
                &|b| exp_affine_in_place(b, 0.7, 1.5),
                &h,
                "exp_affine",
            );
            let (k, n) = (17, 59);
            let x: Vec<f32> = h[..3 * k].to_vec();
            let w: Vec<f32> = (0..k * n).map(|i| h[i % h.len()] * 0.1).collect();
            two(
                &|a| rows_times_unchecked_at(isa, &x, &w, k, n, a),
                &|b| rows_times_body(&x, &w, k, n, b),
                &vec![0.25; 3 * n],
                "rows_times",
            );
            type Update<'a> = &'a dyn Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]);
            let run = |adamw: Update| {
                let (mut p, mut m, mut v) = (h.clone(), vec![0.01f32; h.len()], vec![0.02f32; h.len()]);
                let g: Vec<f32> = h.iter().map(|x| x.sin()).collect();
                adamw(&mut p, &g, &mut m, &mut v);
                [p, m, v]
            };
            let a = run(&|p, g, m, v| adamw_update_at(isa, p, g, m, v, step));
            let b = run(&|p, g, m, v| adamw_chunk(p, g, m, v, step));
            for (what, (x, y)) in ["parameters", "m", "v"].iter().zip(a.iter().zip(&b)) {
                assert!(
                    same(x, y),
                    "adamw_update's {what} on {isa:?} differ from the portable code"
                );
            }
        }
    }
}
