//! The CPU backend: matrix products through the `gemm` crate (AVX-512 kernels chosen at run time),
//! element-wise kernels vectorised by hand-written approximations, all on a rayon pool of a fixed
//! number of threads that this backend owns.

use super::{check_len, Backend, Gelu, Mat, Scalar, SKIP};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows (or elements / 1024) handed to one rayon task: large enough to amortise scheduling, and
/// fixed, so that work splitting never depends on the thread count.
const ROW_CHUNK: usize = 64;
const ELEM_CHUNK: usize = 16 * 1024;

/// The CPU backend. Cheap to clone (the thread pool is shared).
#[derive(Clone)]
pub struct Cpu {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    /// Threads one matrix product may use: `threads`, or 1 inside [`Backend::par_for_each`] tasks.
    gemm_threads: usize,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cpu {{ threads: {} }}", self.threads)
    }
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Each of `processes` processes' share of `threads` compute threads (0: one per core), at
/// least one.
pub fn threads_each(threads: usize, processes: usize) -> usize {
    let total = if threads == 0 { cores() } else { threads };
    (total / processes.max(1)).max(1)
}

/// The most compute threads accepted: four per core (at least 8). More only oversubscribes the
/// cores, and an absurd count (100,000) would hang the process creating the threads.
pub fn max_threads() -> usize {
    (4 * cores()).max(8)
}

impl Cpu {
    /// A CPU backend with `threads` worker threads (0 = one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            threads
        };
        if threads > max_threads() {
            return Err(Error::Backend {
                backend: "cpu",
                detail: format!(
                    "{threads} compute threads is more than this machine can use: it has {} cores (at most {} \
                     threads are accepted)",
                    cores(),
                    max_threads()
                ),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("semoe-cpu-{i}"))
            .build()
            .map_err(|e| Error::Backend {
                backend: "cpu",
                detail: format!("cannot start {threads} threads: {e}"),
            })?;
        Ok(Cpu {
            pool: Arc::new(pool),
            threads,
            gemm_threads: threads,
        })
    }

    /// Number of compute threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` inside this backend's thread pool. Kernels called from `f` run on the pool without a
    /// further hand-off; wrapping a whole forward or backward pass in one `install` saves one
    /// cross-thread hop per kernel.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// Start `f` on this backend's pool and return at once (the actor runtime awaits the result
    /// through a channel, so that compute never runs on the async runtime's threads).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        self.pool.spawn(f)
    }
}

/// `(m, k, n)` of `a @ b`, or the error naming both shapes when the inner dimensions differ.
fn product_shape<T>(a: &Mat<'_, T>, b: &Mat<'_, T>) -> Result<(usize, usize, usize)> {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    if b.rows() != k {
        return Err(Error::shape(
            "matmul",
            format!("inner dimensions differ: {}x{} @ {}x{}", m, k, b.rows(), n),
        ));
    }
    // The output's m * n must not wrap around (with k == 0 both may be huge over empty buffers).
    if m.checked_mul(n).is_none() {
        return Err(Error::shape(
            "matmul",
            format!("the {m}x{n} output has more elements than an address space"),
        ));
    }
    Ok((m, k, n))
}

/// The longest inner dimension one gemm call sums over, where gemm blocks it by the machine's cache.
///
/// For a product with more than 64 rows or columns, gemm splits a longer inner dimension into
/// blocks whose size it derives from the L1 data cache (never below 512): the partial sums
/// round differently on a CPU with a larger L1 (an AVX2 Intel core with 48 KiB of L1 blocks by
/// 1,024 where a Zen 3 blocks by 512), so two machines of the same instruction set would train
/// different bits. Splitting it here, into the balanced slices of at most 512 that gemm itself
/// makes when its block is 512, gives every machine the same sums (and machines that block by
/// 512 the bits they computed before, for the products gemm blocks by its cache). Smaller
/// products use a fixed block of 512 inside gemm already, and a matrix-vector product (one row
/// or one column) no blocks at all: neither is sliced.
const K_SLICE: usize = 512;

/// The slices `[start, end)` of an inner dimension `k` that [`Cpu::gemm_into`] sums one gemm call
/// each, for an `m x n` output (see [`K_SLICE`]).
fn k_slices(m: usize, n: usize, k: usize) -> impl Iterator<Item = (usize, usize)> {
    let cache_blocked = (m > 64 || n > 64) && m > 1 && n > 1;
    let pieces = if cache_blocked { k.div_ceil(K_SLICE).max(1) } else { 1 };
    let slice = k.div_ceil(pieces).max(1);
    (0..pieces).map(move |i| (i * slice, ((i + 1) * slice).min(k)))
}

impl Cpu {
    /// `dst (+)= a @ b` through the gemm crate on this backend's threads, its inner dimension in
    /// the machine-independent slices of [`k_slices`].
    ///
    /// # Safety
    /// `dst` must be valid for `a.rows() * b.cols()` writes (and reads when `accumulate` is set),
    /// must not overlap `a` or `b`, and the shapes must agree (`product_shape`) with `k > 0`.
    unsafe fn gemm_into<T: Scalar>(&self, dst: *mut T, a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool) {
        let (m, k, n) = (a.rows(), a.cols(), b.cols());
        let (a_rs, a_cs) = a.strides();
        let (b_rs, b_cs) = b.strides();
        let dst = SendPtr(dst);
        self.install(move || {
            for (start, end) in k_slices(m, n, k) {
                // SAFETY: the views were checked against their buffers' lengths in `Mat::new`, and
                // a slice's first element lies inside them (start < k); the caller guarantees
                // `dst`, which the slices after the first add to.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        end - start,
                        dst.get(),
                        1,
                        n as isize,
                        accumulate || start > 0,
                        a.data.as_ptr().offset(start as isize * a_cs),
                        a_cs,
                        a_rs,
                        b.data.as_ptr().offset(start as isize * b_rs),
                        b_cs,
                        b_rs,
                        T::ONE,
                        T::ONE,
                        false,
                        false,
                        false,
                        if self.gemm_threads > 1 {
                            gemm::Parallelism::Rayon(self.gemm_threads)
                        } else {
                            gemm::Parallelism::None
                        },
                    )
                }
            }
        });
    }
}

/// A raw output pointer handed to the pool's thread for the duration of one product.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only used inside `Cpu::install`, which returns after the product has
// finished, while the caller still holds the buffer exclusively.
unsafe impl<T> Send for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

impl Backend for Cpu {
    fn name(&self) -> String {
        format!("cpu({} threads)", self.threads)
    }

    fn par_for_each<I: Send>(&self, items: Vec<I>, f: impl Fn(&Self, I) -> Result<()> + Sync + Send) -> Result<()> {
        let task_backend = Cpu {
            gemm_threads: 1,
            ..self.clone()
        };
        self.install(|| {
            items
                .into_par_iter()
                .with_max_len(1)
                .try_for_each(|item| f(&task_backend, item))
        })
    }

    fn matmul<T: Scalar>(&self, dst: &mut [T], a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool) -> Result<()> {
        let (m, k, n) = product_shape(&a, &b)?;
        check_len("matmul output", dst, m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                dst.fill(T::ZERO);
            }
            return Ok(());
        }
        // SAFETY: `gemm_into`'s contract: `dst` holds m*n initialised elements (checked above) and
        // is borrowed mutably, so it cannot alias `a` or `b`; the shapes agree (`product_shape`)
        // and k > 0 (the k == 0 case returned above).
        unsafe { self.gemm_into(dst.as_mut_ptr(), a, b, accumulate) };
        Ok(())
    }

    fn product<T: Scalar>(&self, a: Mat<'_, T>, b: Mat<'_, T>, bias: Option<&[T]>) -> Result<Vec<T>> {
        let (m, k, n) = product_shape(&a, &b)?;
        if let Some(bias) = bias {
            if bias.len() != n {
                return Err(Error::shape(
                    "product bias",
                    format!("{} elements for {n} output columns", bias.len()),
                ));
            }
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(bias);
            }
            self.matmul(&mut out, a, b, true)?;
            return Ok(out);
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(vec![T::ZERO; m * n]);
        }
        let mut out = Vec::with_capacity(m * n);
        // SAFETY: the shapes agree (`product_shape`) and k > 0 (returned above otherwise), and the
        // fresh `out` cannot alias `a` or `b`. `out` has capacity for the m*n elements the product
        // writes. With `read_dst` false the gemm crate (0.19) writes every element of dst without
        // reading it on each of its paths (gevv, gemv, the small-matrix kernels and the blocked
        // one, whose later depth blocks read only what its first block wrote);
        // `product_never_reads_its_output` checks this on every path with a poisoned buffer. Only
        // then does the length cover the writes.
        unsafe {
            self.gemm_into(out.as_mut_ptr(), a, b, false);
            out.set_len(m * n);
        }
        Ok(out)
    }

    fn broadcast_rows<T: Scalar>(&self, dst: &mut [T], bias: &[T]) -> Result<()> {
        if bias.is_empty() || !dst.len().is_multiple_of(bias.len()) {
            return Err(Error::shape(
                "broadcast_rows",
                format!("{} elements are not whole rows of {}", dst.len(), bias.len()),
            ));
        }
        self.install(|| {
            dst.par_chunks_mut(bias.len() * ROW_CHUNK).for_each(|rows| {
                for row in rows.chunks_exact_mut(bias.len()) {
                    row.copy_from_slice(bias);
                }
            })
        });
        Ok(())
    }

    fn add_column_sums<T: Scalar>(&self, acc: &mut [T], m: &[T]) -> Result<()> {
        let cols = acc.len();
        if cols == 0 || !m.len().is_multiple_of(cols) {
            return Err(Error::shape(
                "add_column_sums",
                format!("{} elements are not whole rows of {cols}", m.len()),
            ));
        }
        const COL_CHUNK: usize = 256;
        self.install(|| {
            acc.par_chunks_mut(COL_CHUNK).enumerate().for_each(|(c, acc)| {
                let (start, width) = (c * COL_CHUNK, acc.len());
                for row in m.chunks_exact(cols) {
                    for (a, &v) in acc.iter_mut().zip(&row[start..start + width]) {
                        *a += v;
                    }
                }
            })
        });
        Ok(())
    }

    fn gelu_forward<T: Scalar>(&self, kind: Gelu, h: &[T], a: &mut [T]) -> Result<()> {
        check_len("gelu output", a, h.len())?;
        self.install(|| {
            a.par_chunks_mut(ELEM_CHUNK)
                .zip(h.par_chunks(ELEM_CHUNK))
                .for_each(|(a, h)| T::gelu_forward(kind, h, a))
        });
        Ok(())
    }

    fn gelu_backward<T: Scalar>(&self, kind: Gelu, h: &[T], g: &mut [T]) -> Result<()> {
        check_len("gelu gradient", g, h.len())?;
        self.install(|| {
            g.par_chunks_mut(ELEM_CHUNK)
                .zip(h.par_chunks(ELEM_CHUNK))
                .for_each(|(g, h)| T::gelu_backward(kind, h, g))
        });
        Ok(())
    }

    fn softmax_rows<T: Scalar>(&self, x: &[T], cols: usize, out: &mut [T]) -> Result<Vec<T>> {
        check_len("softmax output", out, x.len())?;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::shape(
                "softmax_rows",
                format!("{} elements are not whole rows of {cols}", x.len()),
            ));
        }
        let mut lse = vec![T::ZERO; x.len() / cols];
        self.install(|| {
            out.par_chunks_mut(cols * ROW_CHUNK)
                .zip(x.par_chunks(cols * ROW_CHUNK))
                .zip(lse.par_chunks_mut(ROW_CHUNK))
                .for_each(|((out, x), lse)| {
                    for ((o, x), l) in out.chunks_exact_mut(cols).zip(x.chunks_exact(cols)).zip(lse) {
                        *l = softmax_row(x, o);
                    }
                })
        });
        Ok(lse)
    }

    fn gather_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        index: &[u32],
        scale: Option<&[T]>,
    ) -> Result<()> {
        check_len("gather_rows output", dst, index.len() * cols)?;
        if let Some(scale) = scale {
            check_len("gather_rows scale", scale, index.len())?;
        }
        check_rows("gather_rows", index, src.len(), cols, false)?;
        if cols == 0 {
            return Ok(());
        }
        self.install(|| {
            dst.par_chunks_mut(cols * ROW_CHUNK).enumerate().for_each(|(c, dst)| {
                for (r, row) in dst.chunks_exact_mut(cols).enumerate() {
                    let i = c * ROW_CHUNK + r;
                    let from = index[i] as usize * cols;
                    let src = &src[from..from + cols];
                    match scale {
                        Some(s) => row.iter_mut().zip(src).for_each(|(o, &v)| *o = s[i] * v),
                        None => row.copy_from_slice(src),
                    }
                }
            })
        });
        Ok(())
    }

    fn gather_sum_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        k: usize,
        index: &[u32],
        weight: Option<&[T]>,
    ) -> Result<()> {
        if cols == 0 || k == 0 {
            return Err(Error::shape(
                "gather_sum_rows",
                format!("cols ({cols}) and k ({k}) must be positive"),
            ));
        }
        check_len("gather_sum_rows index", index, dst.len() / cols * k)?;
        check_len("gather_sum_rows output", dst, index.len() / k * cols)?;
        if let Some(w) = weight {
            check_len("gather_sum_rows weight", w, index.len())?;
        }
        check_rows("gather_sum_rows", index, src.len(), cols, true)?;
        self.install(|| {
            dst.par_chunks_mut(cols * ROW_CHUNK).enumerate().for_each(|(c, dst)| {
                for (r, row) in dst.chunks_exact_mut(cols).enumerate() {
                    let base = (c * ROW_CHUNK + r) * k;
                    row.fill(T::ZERO);
                    for j in base..base + k {
                        if index[j] == SKIP {
                            continue;
                        }
                        let from = index[j] as usize * cols;
                        let src = &src[from..from + cols];
                        match weight {
                            Some(w) => row.iter_mut().zip(src).for_each(|(o, &v)| *o += w[j] * v),
                            None => row.iter_mut().zip(src).for_each(|(o, &v)| *o += v),
                        }
                    }
                }
            })
        });
        Ok(())
    }

    fn scatter_add_rows<T: Scalar>(
        &self,
        dst: &mut [T],
        src: &[T],
        cols: usize,
        index: &[u32],
        scale: Option<&[T]>,
    ) -> Result<()> {
        check_len("scatter_add_rows source", src, index.len() * cols)?;
        if let Some(scale) = scale {
            check_len("scatter_add_rows scale", scale, index.len())?;
        }
        check_rows("scatter_add_rows", index, dst.len(), cols, false)?;
        // Sequential on purpose: rows may repeat, and the order of additions must be fixed.
        for (i, (&d, row)) in index.iter().zip(src.chunks_exact(cols.max(1))).enumerate() {
            let d = d as usize;
            let out = &mut dst[d * cols..(d + 1) * cols];
            match scale {
                Some(s) => {
                    let s = s[i];
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o += s * v);
                }
                None => out.iter_mut().zip(row).for_each(|(o, &v)| *o += v),
            }
        }
        Ok(())
    }
}

/// Check that every index names a row of a buffer of `len` elements in rows of `cols`.
fn check_rows(op: &str, index: &[u32], len: usize, cols: usize, allow_skip: bool) -> Result<()> {
    let rows = len.checked_div(cols).unwrap_or(0);
    match index
        .iter()
        .find(|&&i| i as usize >= rows && !(allow_skip && i == SKIP))
    {
        Some(bad) => Err(Error::shape(op, format!("row {bad} out of range for {rows} rows"))),
        None => Ok(()),
    }
}

/// Softmax of one row into `out`; returns the row's logsumexp.
pub(crate) fn softmax_row<T: Scalar>(x: &[T], out: &mut [T]) -> T {
    let max = crate::kernels::reduce::max(x);
    let out = &mut out[..x.len()];
    out.copy_from_slice(x);
    T::exp_affine(out, T::ONE, max);
    let sum = crate::kernels::reduce::sum(out);
    for o in out.iter_mut() {
        *o = *o / sum;
    }
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_share_the_threads_and_zero_means_every_core() {
        assert_eq!(threads_each(8, 3), 2);
        assert_eq!(threads_each(1, 4), 1, "at least one each");
        assert_eq!(threads_each(6, 0), 6, "no processes: the one process takes all");
        assert_eq!(
            threads_each(0, 2),
            (cores() / 2).max(1),
            "0 is one thread per core, shared"
        );
    }

    #[test]
    fn shapes_whose_size_wraps_around_are_refused() {
        // 2^62 x 4 wraps to 0 elements: an empty buffer must not pass as that matrix.
        let err = Mat::<f32>::new(&[], 1 << 62, 4).expect_err("refused").to_string();
        assert!(err.contains("more elements than an address space"), "{err}");
        // Empty operands with k = 0 and an output of 2^40 x 2^40 elements.
        let a = Mat::<f32>::new(&[], 1 << 40, 0).expect("empty a");
        let b = Mat::<f32>::new(&[], 0, 1 << 40).expect("empty b");
        let cpu = Cpu::new(1).expect("cpu");
        let err = cpu.product(a, b, None).expect_err("refused").to_string();
        assert!(err.contains("the 1099511627776x1099511627776 output"), "{err}");
        let err = cpu.matmul(&mut [], a, b, false).expect_err("refused").to_string();
        assert!(err.contains("more elements than an address space"), "{err}");
    }

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    /// The `rows x cols` matrix `plain` as a view: of `plain` itself, or (when `through_transpose`)
    /// the transposed view of its stored transpose `transposed`, so both stride layouts are tested.
    fn view<'a>(
        plain: &'a [f32],
        transposed: &'a [f32],
        rows: usize,
        cols: usize,
        through_transpose: bool,
    ) -> Result<Mat<'a, f32>> {
        if through_transpose {
            Ok(Mat::new(transposed, cols, rows)?.t())
        } else {
            Mat::new(plain, rows, cols)
        }
    }

    #[test]
    fn matmul_every_transpose_combination_matches_naive() -> Result<()> {
        let cpu = Cpu::new(2)?;
        let (m, k, n) = (37, 29, 41);
        let a = lcg(m * k, 1);
        let b = lcg(k * n, 2);
        let want = naive(&a, &b, m, k, n);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (av, bv) = (view(&a, &at, m, k, ta)?, view(&b, &bt, k, n, tb)?);
            let mut c = vec![1.0f32; m * n];
            cpu.matmul(&mut c, av, bv, true)?;
            for (got, want) in c.iter().zip(&want) {
                assert!((*got as f64 - (want + 1.0)).abs() < 1e-5, "ta={ta} tb={tb}");
            }
            cpu.matmul(&mut c, av, bv, false)?;
            for (got, want) in c.iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 1e-5, "ta={ta} tb={tb}");
            }
        }
        Ok(())
    }

    #[test]
    fn long_inner_dimensions_are_summed_in_slices_that_do_not_depend_on_the_machine() {
        let slices = |m, n, k| k_slices(m, n, k).collect::<Vec<_>>();
        // Balanced slices of at most 512, as gemm blocks at 512.
        assert_eq!(slices(96, 80, 1100), vec![(0, 367), (367, 734), (734, 1100)]);
        assert_eq!(slices(65, 2, 1024), vec![(0, 512), (512, 1024)]);
        assert_eq!(slices(2, 200, 513), vec![(0, 257), (257, 513)]);
        assert_eq!(slices(200, 200, 512), vec![(0, 512)]);
        // Small outputs: gemm's own fixed block of 512, no cache involved; a matrix-vector
        // product (decoding one sequence) sums without blocks.
        assert_eq!(slices(64, 64, 2000), vec![(0, 2000)]);
        assert_eq!(slices(65, 1, 1024), vec![(0, 1024)]);
        assert_eq!(slices(1, 200, 1024), vec![(0, 1024)]);
        assert_eq!(slices(96, 80, 1), vec![(0, 1)]);
    }

    /// A product over a long inner dimension is bitwise the sum of its slices' products, each of
    /// which gemm sums in one block on any machine, and agrees with the exact product (on a
    /// machine whose L1 makes gemm block by more than 512, the bits differ without the slicing).
    #[test]
    fn a_long_product_is_bitwise_its_slices_added_in_order() -> Result<()> {
        let cpu = Cpu::new(1)?;
        let (m, k, n) = (96, 1100, 80);
        let a = lcg(m * k, 3);
        let b = lcg(k * n, 4);
        let mut whole = vec![0.0f32; m * n];
        cpu.matmul(&mut whole, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, false)?;
        let mut sliced = vec![0.0f32; m * n];
        let bounds = [(0, 367), (367, 734), (734, 1100)];
        for (i, &(start, end)) in bounds.iter().enumerate() {
            let width = end - start;
            let a_part: Vec<f32> = (0..m).flat_map(|r| a[r * k + start..r * k + end].to_vec()).collect();
            let b_part = &b[start * n..end * n];
            cpu.matmul(
                &mut sliced,
                Mat::new(&a_part, m, width)?,
                Mat::new(b_part, width, n)?,
                i > 0,
            )?;
        }
        assert_eq!(whole.len(), sliced.len());
        let first = whole.iter().zip(&sliced).position(|(x, y)| x.to_bits() != y.to_bits());
        assert_eq!(first, None, "the long product differs from its slices");
        let want = naive(&a, &b, m, k, n);
        for (got, want) in whole.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-4, "{got} against {want}");
        }
        Ok(())
    }

    /// `product` hands gemm an uninitialised buffer with `read_dst` off, which is sound only if no
    /// path of the crate reads dst then. Poison dst with NaN and overwrite it on every path the
    /// crate picks by shape: k <= 2 (gevv), one row or one column (gemv, both layouts), at most
    /// 16 x 16 outputs (the small kernels), the blocked kernel, and depths beyond one depth block;
    /// any read of the poison would leave a NaN.
    #[test]
    fn product_never_reads_its_output() -> Result<()> {
        let shapes = [
            (5, 1, 7),
            (5, 2, 7),
            (9, 33, 1),
            (1, 33, 9),
            (4, 40, 4),
            (16, 64, 16),
            (37, 29, 41),
            (70, 1100, 50),
            (300, 700, 130),
        ];
        for threads in [1, 2] {
            let cpu = Cpu::new(threads)?;
            for (m, k, n) in shapes {
                let (a, b) = (lcg(m * k, 5), lcg(k * n, 6));
                let want = naive(&a, &b, m, k, n);
                let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (av, bv) = (view(&a, &at, m, k, ta)?, view(&b, &bt, k, n, tb)?);
                    let mut c = vec![f32::NAN; m * n];
                    cpu.matmul(&mut c, av, bv, false)?;
                    let fresh = cpu.product(av, bv, None)?;
                    assert_eq!((c.len(), fresh.len()), (want.len(), want.len()));
                    for ((got, new), want) in c.iter().zip(&fresh).zip(&want) {
                        let what = format!("{m}x{k}x{n} ta={ta} tb={tb} threads={threads}");
                        assert!(
                            (*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{what}: {got} vs {want}"
                        );
                        assert_eq!(got.to_bits(), new.to_bits(), "{what}: product differs from matmul");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn product_with_bias_equals_broadcast_then_accumulate() -> Result<()> {
        let cpu = Cpu::new(2)?;
        let (m, k, n) = (33, 20, 24);
        let (a, b, bias) = (lcg(m * k, 7), lcg(k * n, 8), lcg(n, 9));
        let (av, bv) = (Mat::new(&a, m, k)?, Mat::new(&b, k, n)?);
        let mut want = vec![0.0f32; m * n];
        cpu.broadcast_rows(&mut want, &bias)?;
        cpu.matmul(&mut want, av, bv, true)?;
        let got = cpu.product(av, bv, Some(&bias))?;
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(cpu.product(av, bv, Some(&bias[..n - 1])).is_err());
        assert!(cpu.product(av, av, None).is_err());
        Ok(())
    }

    #[test]
    fn matmul_rejects_mismatched_shapes() -> Result<()> {
        let cpu = Cpu::new(1)?;
        let a = vec![0.0f32; 6];
        let mut c = vec![0.0f32; 4];
        let err = cpu.matmul(&mut c, Mat::new(&a, 2, 3)?, Mat::new(&a, 2, 3)?, false);
        assert!(matches!(err, Err(Error::Shape { .. })));
        assert!(Mat::new(&a, 4, 2).is_err());
        Ok(())
    }

    #[test]
    fn results_do_not_depend_on_thread_count() -> Result<()> {
        let (one, two) = (Cpu::new(1)?, Cpu::new(2)?);
        let (m, k, n) = (300, 512, 384);
        let a = lcg(m * k, 3);
        let b = lcg(k * n, 4);
        let mut c1 = vec![0.0f32; m * n];
        let mut c2 = vec![0.0f32; m * n];
        one.matmul(&mut c1, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, false)?;
        two.matmul(&mut c2, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, false)?;
        assert_eq!(c1, c2);
        // transposed operands too (the backward passes use them)
        one.matmul(&mut c1, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, true)?;
        two.matmul(&mut c2, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, true)?;
        assert_eq!(c1, c2);
        let mut g1 = vec![0.0f32; k * k];
        let mut g2 = vec![0.0f32; k * k];
        one.matmul(&mut g1, Mat::new(&a, m, k)?.t(), Mat::new(&a, m, k)?, false)?;
        two.matmul(&mut g2, Mat::new(&a, m, k)?.t(), Mat::new(&a, m, k)?, false)?;
        assert_eq!(g1, g2);

        let h = lcg(100_000, 5);
        let (mut a1, mut a2) = (vec![0.0f32; h.len()], vec![0.0f32; h.len()]);
        one.gelu_forward(Gelu::Erf, &h, &mut a1)?;
        two.gelu_forward(Gelu::Erf, &h, &mut a2)?;
        assert_eq!(a1, a2);
        let mut s1 = vec![0.0f32; 384];
        let mut s2 = vec![0.0f32; 384];
        one.add_column_sums(&mut s1, &b)?;
        two.add_column_sums(&mut s2, &b)?;
        assert_eq!(s1, s2);
        let l1 = one.softmax_rows(&h[..8000], 8, &mut a1[..8000])?;
        let l2 = two.softmax_rows(&h[..8000], 8, &mut a2[..8000])?;
        assert_eq!(l1, l2);
        assert_eq!(a1[..8000], a2[..8000]);
        Ok(())
    }

    #[test]
    fn gather_and_scatter_by_index() -> Result<()> {
        let cpu = Cpu::new(2)?;
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect(); // 4 rows of 3
        let mut g = vec![0.0; 9];
        cpu.gather_rows(&mut g, &src, 3, &[2, 0, 2], None)?;
        assert_eq!(g, [6., 7., 8., 0., 1., 2., 6., 7., 8.]);
        let mut s = vec![0.0; 6];
        cpu.gather_sum_rows(&mut s, &src, 3, 2, &[2, 0, SKIP, 3], Some(&[1.0, 2.0, 5.0, 1.0]))?;
        assert_eq!(s, [6., 9., 12., 9., 10., 11.]);
        assert!(cpu.gather_sum_rows(&mut s, &src, 3, 2, &[2, 4, SKIP, 3], None).is_err());
        let mut d = vec![0.0; 6];
        cpu.scatter_add_rows(&mut d, &g, 3, &[1, 0, 1], Some(&[1.0, 2.0, 0.5]))?;
        assert_eq!(d, [0., 2., 4., 9., 10.5, 12.]);
        assert!(cpu.gather_rows(&mut g, &src, 3, &[4, 0, 0], None).is_err());
        assert!(cpu.scatter_add_rows(&mut d, &g, 3, &[2, 0, 0], None).is_err());
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_return_logsumexp() -> Result<()> {
        let cpu = Cpu::new(1)?;
        let x = [1.0f64, 2.0, 3.0, 1000.0, 1000.0, 1000.0];
        let mut p = [0.0; 6];
        let lse = cpu.softmax_rows(&x, 3, &mut p)?;
        let want0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lse[0] - want0).abs() < 1e-12);
        assert!((lse[1] - (1000.0 + 3f64.ln())).abs() < 1e-9);
        assert!((p[3] - 1.0 / 3.0).abs() < 1e-15);
        Ok(())
    }
}
