//! Compute kernels: the [`Backend`] trait, the element types it works on ([`Scalar`]), and the
//! backends themselves: [`cpu`] (the `gemm` crate plus vectorised element-wise kernels) and [`cuda`]
//! (cudarc; a dummy twin that reports "built without CUDA" when the `cuda` feature is off).
//!
//! Every kernel is deterministic: its result does not depend on the number of threads. Reductions run
//! in a fixed order per output element, and element-wise kernels never contract multiply-adds, so the
//! AVX-512, AVX2 and portable versions of a kernel agree bit for bit.

pub mod bytes;
pub mod cpu;
pub mod cuda;
mod math;
pub mod reduce;
mod scalar;

pub use cpu::Cpu;
use math::rows_times_unchecked;
pub(crate) use math::{adamw_update, AdamwStep};
pub use scalar::Scalar;

use crate::error::{Error, Result};

/// `out[r] += x[r] @ w` for `x` `[rows][k]`, `w` `[k][n]`, `out` `[rows][n]`, single-threaded, with
/// each output element summed as a chain of fused multiply-adds in the order of `k`. Unlike
/// [`Backend::matmul`], a row's bits never depend on how many rows are computed with it: batched
/// decoding (src/infer/) relies on that so that a sequence gets the same bytes alone or in a batch.
pub fn rows_times(x: &[f32], w: &[f32], k: usize, n: usize, out: &mut [f32]) -> Result<()> {
    if k == 0 || n == 0 || !x.len().is_multiple_of(k) {
        return Err(Error::shape(
            "rows_times",
            format!("{} inputs are not whole rows of {k}", x.len()),
        ));
    }
    check_len("rows_times weights", w, k * n)?;
    check_len("rows_times output", out, x.len() / k * n)?;
    rows_times_unchecked(x, w, k, n, out);
    Ok(())
}

/// Which form of GELU an expert uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Gelu {
    /// The exact form `0.5 x (1 + erf(x / sqrt 2))`.
    #[default]
    Erf,
    /// The tanh approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    Tanh,
}

impl std::str::FromStr for Gelu {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "erf" => Ok(Gelu::Erf),
            "tanh" => Ok(Gelu::Tanh),
            other => Err(Error::config(format!(
                "gelu must be \"erf\" or \"tanh\", got {other:?}"
            ))),
        }
    }
}

/// A read-only matrix view over a row-major buffer, optionally transposed.
///
/// `data` holds `stored_rows x stored_cols` elements in row-major order; when `transposed` is set the
/// logical matrix is the transpose of what is stored. Transposition is free: it only swaps strides.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    data: &'a [T],
    stored_rows: usize,
    stored_cols: usize,
    transposed: bool,
}

impl<'a, T> Mat<'a, T> {
    /// A view of `data` as a `rows x cols` row-major matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        // Checked: a product that wraps around would let a short buffer pass as a large matrix
        // (and the unsafe products trust these views).
        let Some(elements) = rows.checked_mul(cols) else {
            return Err(Error::shape(
                "matrix view",
                format!("{rows}x{cols} has more elements than an address space"),
            ));
        };
        if data.len() != elements {
            return Err(Error::shape(
                "matrix view",
                format!("{rows}x{cols} needs {elements} elements, buffer has {}", data.len()),
            ));
        }
        Ok(Mat {
            data,
            stored_rows: rows,
            stored_cols: cols,
            transposed: false,
        })
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Logical number of rows.
    pub fn rows(&self) -> usize {
        if self.transposed {
            self.stored_cols
        } else {
            self.stored_rows
        }
    }

    /// Logical number of columns.
    pub fn cols(&self) -> usize {
        if self.transposed {
            self.stored_rows
        } else {
            self.stored_cols
        }
    }

    /// (row stride, column stride) of the logical matrix, in elements.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.stored_cols as isize)
        } else {
            (self.stored_cols as isize, 1)
        }
    }
}

/// The operations a compute backend provides. The model code is written against this trait.
///
/// All matrices are row-major; `dst` buffers must have exactly the output's number of elements.
pub trait Backend: Send + Sync {
    /// A short name for logs and reports (`cpu(2 threads)`).
    fn name(&self) -> String;

    /// Run independent tasks concurrently (one per item), each given a backend handle whose matrix
    /// products run single-threaded on the task's thread. This is how experts run side by side: an
    /// expert's products keep the same shapes and the same single-threaded kernel whatever the
    /// number of threads, and two whole products on two cores beat one product split in two.
    fn par_for_each<I: Send>(&self, items: Vec<I>, f: impl Fn(&Self, I) -> Result<()> + Sync + Send) -> Result<()>
    where
        Self: Sized;

    /// [`Backend::par_for_each`] with a result per item, returned in item order.
    fn par_map<I: Send, O: Send>(
        &self,
        items: Vec<I>,
        f: impl Fn(&Self, I) -> Result<O> + Sync + Send,
    ) -> Result<Vec<O>>
    where
        Self: Sized,
    {
        let mut slots: Vec<(Option<I>, Option<O>)> = items.into_iter().map(|i| (Some(i), None)).collect();
        self.par_for_each(slots.iter_mut().collect(), |b, (item, out)| {
            if let Some(item) = item.take() {
                *out = Some(f(b, item)?);
            }
            Ok(())
        })?;
        slots
            .into_iter()
            .map(|(_, out)| out.ok_or_else(|| Error::runtime("a parallel task left no result")))
            .collect()
    }

    /// `dst = op(a) @ op(b)`, or `dst += op(a) @ op(b)` when `accumulate` is set.
    fn matmul<T: Scalar>(&self, dst: &mut [T], a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool) -> Result<()>;

    /// `op(a) @ op(b)` into a new buffer, with `bias` added to every row when given (the bias
    /// first, then the product added to it: the bits of [`Backend::broadcast_rows`] followed by an
    /// accumulating [`Backend::matmul`]). A backend may skip zero-filling the new buffer: the
    /// product's write is then its first, which saves a pass over memory per activation.
    fn product<T: Scalar>(&self, a: Mat<'_, T>, b: Mat<'_, T>, bias: Option<&[T]>) -> Result<Vec<T>> {
        let mut out = vec![T::ZERO; a.rows() * b.cols()];
        match bias {
            Some(bias) => {
                self.broadcast_rows(&mut out, bias)?;
                self.matmul(&mut out, a, b, true)?;
            }
            None => self.matmul(&mut out, a, b, false)?,
        }
        Ok(out)
    }

    /// Overwrite every row of the `rows x bias.len()` matrix `dst` with `bias`.
    fn broadcast_rows<T: Scalar>(&self, dst: &mut [T], bias: &[T]) -> Result<()>;

    /// `acc[j] += sum_i m[i][j]` for a row-major matrix with `acc.len()` columns (bias gradients).
    /// Rows are added in order, so the result is independent of the thread count.
    fn add_column_sums<T: Scalar>(&self, acc: &mut [T], m: &[T]) -> Result<()>;

    /// `a = gelu(h)` element-wise.
    fn gelu_forward<T: Scalar>(&self, kind: Gelu, h: &[T], a: &mut [T]) -> Result<()>;

    /// `g = g * gelu'(h)` element-wise: turns the gradient w.r.t. `gelu(h)` into the gradient w.r.t. `h`.
    fn gelu_backward<T: Scalar>(&self, kind: Gelu, h: &[T], g: &mut [T]) -> Result<()>;

    /// Row-wise softmax of a `rows x cols` matrix into `out`; also returns each row's logsumexp.
    fn softmax_rows<T: Scalar>(&self, x: &[T], cols: usize, out: &mut [T]) -> Result<Vec<T>>;

    /// Copy rows `index[i]` of `src` (row length `cols`) into row `i` of `dst`, multiplied by
    /// `scale[i]` when a scale is given.
    fn gather_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        index: &[u32],
        scale: Option<&[T]>,
    ) -> Result<()>;

    /// Weighted gather-sum: `dst[r] = sum_j weight[r*k + j] * src[index[r*k + j]]` for `j` in
    /// `0..k` (in that order), skipping entries whose index is [`SKIP`]; weight 1 when none given.
    /// This is the MoE combine (and the dispatch's backward): each output row is owned by one task,
    /// so it parallelises without atomics and its sum order is fixed.
    fn gather_sum_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        k: usize,
        index: &[u32],
        weight: Option<&[T]>,
    ) -> Result<()>;

    /// `dst[index[i]] += scale[i] * src[i]` row-wise, applied in increasing `i` for every
    /// destination row, so the sum's order is fixed. Indices may repeat.
    fn scatter_add_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        index: &[u32],
        scale: Option<&[T]>,
    ) -> Result<()>;
}

/// Index value meaning "no row" in [`Backend::gather_sum_rows`].
pub const SKIP: u32 = u32::MAX;

/// Check that a buffer has the expected number of elements.
pub(crate) fn check_len<T>(what: &str, buf: &[T], expected: usize) -> Result<()> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(Error::shape(
            what,
            format!("expected {expected} elements, got {}", buf.len()),
        ))
    }
}
