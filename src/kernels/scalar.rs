//! The element types the kernels work on: `f32` for real work, `f64` for gradient checks.

use super::{math, Gelu};
use std::fmt::{Debug, Display};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point element type the backends support.
///
/// The element-wise GELU kernels are methods of the type so that `f32` can use vectorised
/// approximations while `f64` (used for finite-difference checks) uses exact library functions.
pub trait Scalar:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + Display
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// 0
    const ZERO: Self;
    /// 1
    const ONE: Self;
    /// The type's name, for messages.
    const NAME: &'static str;

    /// Conversion from f64 (rounding to nearest).
    fn from_f64(v: f64) -> Self;
    /// Conversion to f64 (exact).
    fn to_f64(self) -> f64;
    /// Conversion from a count.
    fn from_usize(v: usize) -> Self {
        Self::from_f64(v as f64)
    }
    /// e^self
    fn exp(self) -> Self;
    /// natural logarithm
    fn ln(self) -> Self;
    /// the larger of two values
    fn max(self, other: Self) -> Self {
        if other > self {
            other
        } else {
            self
        }
    }
    /// `x = exp(x * scale - shift)` over a slice (softmax numerators; vectorised for f32).
    fn exp_affine(x: &mut [Self], scale: Self, shift: Self);
    /// `a = gelu(h)` over slices.
    fn gelu_forward(kind: Gelu, h: &[Self], a: &mut [Self]);
    /// `g *= gelu'(h)` over slices.
    fn gelu_backward(kind: Gelu, h: &[Self], g: &mut [Self]);
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f32";
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn exp_affine(x: &mut [Self], scale: Self, shift: Self) {
        math::exp_affine(x, scale, shift)
    }
    fn gelu_forward(kind: Gelu, h: &[Self], a: &mut [Self]) {
        match kind {
            Gelu::Erf => math::gelu_erf_forward(h, a),
            Gelu::Tanh => math::gelu_tanh_forward(h, a),
        }
    }
    fn gelu_backward(kind: Gelu, h: &[Self], g: &mut [Self]) {
        match kind {
            Gelu::Erf => math::gelu_erf_backward(h, g),
            Gelu::Tanh => math::gelu_tanh_backward(h, g),
        }
    }
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NAME: &'static str = "f64";
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn exp_affine(x: &mut [Self], scale: Self, shift: Self) {
        x.iter_mut().for_each(|v| *v = (*v * scale - shift).exp());
    }
    fn gelu_forward(kind: Gelu, h: &[Self], a: &mut [Self]) {
        for (a, &x) in a.iter_mut().zip(h) {
            *a = match kind {
                Gelu::Erf => 0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)),
                Gelu::Tanh => 0.5 * x * (1.0 + (tanh_arg(x)).tanh()),
            };
        }
    }
    fn gelu_backward(kind: Gelu, h: &[Self], g: &mut [Self]) {
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        for (g, &x) in g.iter_mut().zip(h) {
            *g *= match kind {
                Gelu::Erf => {
                    0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
                        + x * inv_sqrt_2pi * (-0.5 * x * x).exp()
                }
                Gelu::Tanh => {
                    let t = tanh_arg(x).tanh();
                    let du = (2.0 / std::f64::consts::PI).sqrt() * (1.0 + 3.0 * 0.044715 * x * x);
                    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
                }
            };
        }
    }
}

fn tanh_arg(x: f64) -> f64 {
    (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)
}
