//! One GPU as the layers use it: a stream, a cuBLAS handle on that stream, and the NVRTC-compiled
//! kernels of `moe_kernels.cu` and `model_kernels.cu`. Everything queued on one [`Gpu`] runs in
//! order on its stream, so buffers need no other synchronisation, and a run repeats bit for bit.

use super::budget::BudgetPool;
use super::device::{cuda_error, CudaDevice};
use super::{GpuMemory, Precision, KERNEL_NAMES};
use crate::error::{Error, Result};
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchConfig,
    ValidAsZeroBits,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The CUDA C source of every kernel: the MoE layer's, then the dense model's (which use the
/// MoE file's helpers, `block_sum` and the GELU forms).
const KERNELS: &str = concat!(include_str!("moe_kernels.cu"), "\n", include_str!("model_kernels.cu"));

/// Threads per block of the row and element-wise kernels (a power of two: the block sums need it).
pub(crate) const BLOCK: u32 = 256;
/// Threads of the single-block kernels (prefix counts, router losses).
pub(crate) const WIDE_BLOCK: u32 = 1024;
/// Most blocks of a grid-stride kernel.
const MAX_BLOCKS: u64 = 1 << 16;

fn nvrtc_present() -> bool {
    // SAFETY: as for the driver probe (src/kernels/cuda/device.rs): dlopen and close only.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

fn cublas_present() -> bool {
    // SAFETY: as above.
    std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false)
}

/// Compile every kernel with NVRTC and return the PTX text. Needs only the NVRTC library (no GPU):
/// tests run it wherever NVRTC is installed, so that a kernel that does not compile is caught
/// before a GPU is at hand.
pub fn compile_kernels() -> Result<String> {
    compile().map(|ptx| ptx.to_src())
}

fn compile() -> Result<cudarc::nvrtc::Ptx> {
    if !nvrtc_present() {
        return Err(cuda_error(
            "cannot compile the CUDA kernels: the NVRTC library (libnvrtc.so) was not found",
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        name: Some("semoe_kernels.cu".into()),
        ..Default::default()
    };
    std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts))
        .map_err(|_| cuda_error("NVRTC panicked while compiling the kernels"))?
        .map_err(|e| cuda_error(format!("NVRTC could not compile the kernels: {e}")))
}

/// One row-major product `C (m x n) = op(A) (m x k) @ op(B) (k x n)` (`+ C` when `accumulate`),
/// repeated `batch` times over consecutive blocks of A, B and C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
    pub batch: usize,
    pub accumulate: bool,
}

impl Product {
    /// A single product.
    pub fn new(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, accumulate: bool) -> Self {
        Product {
            m,
            n,
            k,
            a_t,
            b_t,
            batch: 1,
            accumulate,
        }
    }

    /// `batch` products over consecutive blocks.
    pub fn batched(self, batch: usize) -> Self {
        Product { batch, ..self }
    }
}

/// A size as the 32-bit int that cuBLAS and the kernels take.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| cuda_error(format!("{what} = {v} does not fit the GPU code's 32-bit sizes")))
}

/// The error of a driver call.
pub(crate) fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| cuda_error(format!("{what}: {e}"))
}

/// The error of a kernel launch that failed.
pub(crate) fn launch(kernel: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| cuda_error(format!("kernel {kernel}: {e}"))
}

/// A grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: u64) -> LaunchConfig {
    grid(n.div_ceil(BLOCK as u64).clamp(1, MAX_BLOCKS) as u32, BLOCK, 0)
}

/// A launch of one thread per element (no grid stride), `n` >= 1.
pub(crate) fn per_element(n: u64) -> LaunchConfig {
    grid(n.div_ceil(BLOCK as u64).max(1) as u32, BLOCK, 0)
}

/// `blocks` blocks of `threads` threads with `shared` bytes of dynamic shared memory.
pub(crate) fn grid(blocks: u32, threads: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// A GPU's stream, cuBLAS handle and kernels.
pub struct Gpu {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// How the matrix products compute (bf16 chooses the cuBLAS call, the others a math mode).
    precision: Precision,
    kernels: BTreeMap<&'static str, CudaFunction>,
    name: String,
    /// The Device tier's budget, when one bounds this GPU's tensors ([`Gpu::budgeted`]).
    pool: Option<BudgetPool>,
}

impl Gpu {
    /// A stream on `device`, a cuBLAS handle in `precision`, and the kernels compiled and loaded.
    pub fn new(device: &CudaDevice, precision: Precision) -> Result<Arc<Self>> {
        Self::budgeted(device, precision, None)
    }

    /// [`Gpu::new`] with every tensor allocated from a memory pool of at most `device_budget`
    /// bytes (the Device tier's budget; `None`: the whole GPU). An allocation past it fails with
    /// an error naming the budget, and [`Gpu::memory`] reports the pool's peak.
    pub fn budgeted(device: &CudaDevice, precision: Precision, device_budget: Option<u64>) -> Result<Arc<Self>> {
        super::device::guarded("setting up the GPU", || Gpu::start(device, precision, device_budget))?
    }

    fn start(device: &CudaDevice, precision: Precision, device_budget: Option<u64>) -> Result<Arc<Self>> {
        let pool = device_budget
            .map(|budget| BudgetPool::new(device.context(), budget))
            .transpose()?;
        if !cublas_present() {
            return Err(cuda_error("the cuBLAS library (libcublas.so) was not found"));
        }
        let ptx = compile()?;
        let ctx = device.context();
        let stream = ctx.new_stream().map_err(driver("cannot create a CUDA stream"))?;
        let module = ctx.load_module(ptx).map_err(driver("cannot load the kernels"))?;
        let mut kernels = BTreeMap::new();
        for name in KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| cuda_error(format!("kernel {name} is missing from the module: {e}")))?;
            kernels.insert(name, f);
        }
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| cuda_error(format!("cannot create a cuBLAS handle: {e}")))?;
        let mode = match precision {
            // bf16 is the compute type of each product (`Gpu::product`), not a math mode.
            Precision::F32 | Precision::Bf16 => blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            Precision::Tf32 => blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: the handle is alive (owned by `blas`) and the mode is a valid enumerator.
        let status = unsafe { blas_sys::cublasSetMathMode(*blas.handle(), mode) };
        if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cuda_error(format!(
                "cannot set cuBLAS's math mode to {precision:?}: {status:?}"
            )));
        }
        Ok(Arc::new(Gpu {
            stream,
            blas,
            precision,
            kernels,
            name: device.name(),
            pool,
        }))
    }

    /// The budgeted pool's figures (`None` without a budget: the GPU's whole memory is open to it).
    pub fn memory(&self) -> Result<Option<GpuMemory>> {
        self.pool.as_ref().map(BudgetPool::memory).transpose()
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A loaded kernel.
    pub(crate) fn kernel(&self, name: &'static str) -> Result<&CudaFunction> {
        self.kernels
            .get(name)
            .ok_or_else(|| cuda_error(format!("kernel {name} was not loaded")))
    }

    /// Wait until everything queued has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver("the GPU's work failed"))
    }

    /// A copy of `data` on the GPU (through [`Gpu::alloc`] with or without a budget, so an empty
    /// `data` gives a buffer of one element either way: CUDA refuses empty allocations).
    pub(crate) fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        let mut buf = self.alloc::<T>(data.len())?;
        if !data.is_empty() {
            self.stream
                .memcpy_htod(data, &mut buf)
                .map_err(driver("cannot copy to the GPU"))?;
        }
        Ok(buf)
    }

    /// A copy of a GPU buffer on the host (waits for the work queued before it).
    pub(crate) fn download<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(buf).map_err(driver("cannot copy from the GPU"))
    }

    /// An uninitialised buffer of `n` elements (at least one: CUDA refuses empty allocations).
    /// From the budget's pool when there is one.
    pub(crate) fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        let n = n.max(1);
        let Some(pool) = &self.pool else {
            // SAFETY: every caller writes the elements it later reads (the kernels and products
            // write their whole output before anything reads it).
            return unsafe { self.stream.alloc::<T>(n) }.map_err(driver("cannot allocate GPU memory"));
        };
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| cuda_error(format!("{n} elements do not fit in memory")))?;
        let ptr = pool.alloc(self.stream.cu_stream(), bytes)?;
        // SAFETY: `ptr` is a live allocation of `bytes` = n elements of T, ordered on this stream;
        // the slice frees it (stream-ordered) when dropped. Callers write before reading, as above.
        // cudarc panics when it cannot make the slice's two events: free the memory, say why.
        let upgraded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            self.stream.upgrade_device_ptr(ptr, n)
        }));
        upgraded.map_err(|_| {
            pool.free(self.stream.cu_stream(), ptr);
            cuda_error("cannot create the CUDA events of a GPU buffer (the GPU may be out of memory)")
        })
    }

    /// A zeroed buffer of `n` elements (at least one).
    pub(crate) fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        if self.pool.is_none() {
            return self
                .stream
                .alloc_zeros::<T>(n.max(1))
                .map_err(driver("cannot allocate GPU memory"));
        }
        let mut buf = self.alloc::<T>(n)?;
        self.zero(&mut buf)?;
        Ok(buf)
    }

    /// Set a buffer to zero.
    pub(crate) fn zero<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut CudaSlice<T>) -> Result<()> {
        self.stream.memset_zeros(buf).map_err(driver("cannot zero GPU memory"))
    }

    /// [`CudaBlas::gemm_strided_batched`] of float32 operands with bfloat16 tensor-core products
    /// (`cublasGemmStridedBatchedEx`, compute type `CUBLAS_COMPUTE_32F_FAST_16BF`): the same
    /// buffers and layout, only the products' inputs rounded. The caller checked the operands'
    /// lengths against `cfg`.
    fn product_bf16<A, B, C>(
        &self,
        cfg: StridedBatchedConfig<f32>,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> std::result::Result<(), cudarc::cublas::result::CublasError>
    where
        A: DevicePtr<f32>,
        B: DevicePtr<f32>,
        C: DevicePtrMut<f32>,
    {
        let (a, _record_a) = a.device_ptr(&self.stream);
        let (b, _record_b) = b.device_ptr(&self.stream);
        let (c, _record_c) = c.device_ptr_mut(&self.stream);
        let g = &cfg.gemm;
        let f32_type = blas_sys::cudaDataType::CUDA_R_32F;
        // SAFETY: the pointers are live device allocations of the stream's context, held for the
        // call by their records; the caller checked that they hold batch * (m k, k n, m n)
        // floats, which the strides and leading dimensions stay within; alpha and beta are host
        // floats, as the default pointer mode expects.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                g.transa,
                g.transb,
                g.m,
                g.n,
                g.k,
                (&g.alpha as *const f32).cast(),
                a as *const std::ffi::c_void,
                f32_type,
                g.lda,
                cfg.stride_a,
                b as *const std::ffi::c_void,
                f32_type,
                g.ldb,
                cfg.stride_b,
                (&g.beta as *const f32).cast(),
                c as *mut std::ffi::c_void,
                f32_type,
                g.ldc,
                cfg.stride_c,
                cfg.batch_size,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
    }

    /// One row-major product (see [`Product`]) through cuBLAS's column-major interface: a row-major
    /// matrix is the column-major view of its transpose, so `C = A B` is computed as `C^T = B^T A^T`.
    pub(crate) fn product<A, B, C>(&self, p: Product, a: &A, b: &B, c: &mut C) -> Result<()>
    where
        A: DevicePtr<f32>,
        B: DevicePtr<f32>,
        C: DevicePtrMut<f32> + DeviceSlice<f32>,
    {
        if p.m == 0 || p.n == 0 || p.batch == 0 {
            return Ok(());
        }
        let shape = || format!("GPU product {}x{}x{} (batch {})", p.m, p.n, p.k, p.batch);
        // Checked: a wrapped product would pass the length check below and let cuBLAS run past
        // the allocations.
        let elements = |rows: usize, cols: usize| {
            rows.checked_mul(cols)
                .ok_or_else(|| Error::shape(shape(), "an operand's size overflows"))
        };
        let (a_len, b_len, c_len) = (elements(p.m, p.k)?, elements(p.k, p.n)?, elements(p.m, p.n)?);
        for (what, have, each) in [
            ("A", DeviceSlice::len(a), a_len),
            ("B", DeviceSlice::len(b), b_len),
            ("C", DeviceSlice::len(c), c_len),
        ] {
            let want = each
                .checked_mul(p.batch)
                .ok_or_else(|| Error::shape(shape(), "an operand's size overflows"))?;
            if have < want {
                return Err(Error::shape(
                    shape(),
                    format!("operand {what} has {have} elements, needs {want}"),
                ));
            }
        }
        let stride = |n: usize| i64::try_from(n).map_err(|_| Error::shape(shape(), "a stride overflows"));
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let gemm = GemmConfig {
            transa: op(p.b_t),
            transb: op(p.a_t),
            m: int(p.n, "product columns")?,
            n: int(p.m, "product rows")?,
            k: int(p.k, "product inner size")?,
            alpha: 1.0f32,
            lda: int(if p.b_t { p.k } else { p.n }.max(1), "leading dimension")?,
            ldb: int(if p.a_t { p.m } else { p.k }.max(1), "leading dimension")?,
            beta: if p.accumulate { 1.0f32 } else { 0.0 },
            ldc: int(p.n, "leading dimension")?,
        };
        let cfg = StridedBatchedConfig {
            gemm,
            batch_size: int(p.batch, "batch")?,
            stride_a: stride(b_len)?,
            stride_b: stride(a_len)?,
            stride_c: stride(c_len)?,
        };
        let done = if self.precision == Precision::Bf16 {
            self.product_bf16(cfg, b, a, c)
        } else {
            // SAFETY: the operands hold at least batch * (m k, k n, m n) elements (checked above),
            // which the strides and leading dimensions stay within.
            unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) }
        };
        done.map_err(|e| {
            cuda_error(format!(
                "cuBLAS product {}x{}x{} (batch {}): {e}",
                p.m, p.n, p.k, p.batch
            ))
        })
    }
}
