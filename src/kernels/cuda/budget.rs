//! The Device tier's budget on a GPU: a CUDA memory pool of at most the budget's bytes, from which
//! every tensor of a budgeted [`Gpu`](super::Gpu) is allocated (stream-ordered, as cudarc's own
//! allocations are). The driver refuses an allocation that would take the pool past its size, so
//! the budget holds however the model's tensors come and go; the pool's own counters give what
//! its tensors used and what it reserved from the GPU (in the driver's granules), at most, which
//! the training summary reports. The budget is rounded down to the GPU's allocation granule
//! (2 MiB on current GPUs), since the driver would round a pool's size up.
//!
//! What the pool does not hold: cuBLAS's workspace, the NCCL communicators' buffers and the CUDA
//! context itself, which their libraries allocate outside it (tens to a few hundred MiB).

use super::device::cuda_error;
use super::GpuMemory;
use crate::console::format_bytes;
use crate::error::{Error, Result};
use cudarc::driver::sys;
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// The first driver whose memory pools honour a maximum size (CUDA 12.2; older drivers read the
/// field as reserved bytes and would let the pool grow without bound).
const POOL_MAX_SIZE_DRIVER: i32 = 12020;

/// A memory pool on one GPU bounded by a budget.
pub(crate) struct BudgetPool {
    pool: sys::CUmemoryPool,
    budget: u64,
    ctx: Arc<CudaContext>,
}

// SAFETY: a memory pool is a process-wide driver object; the driver API may be called with it from
// any thread (every call below binds the context first).
unsafe impl Send for BudgetPool {}
// SAFETY: as above: the handle is never mutated after creation, and the driver synchronises its
// own use of the pool.
unsafe impl Sync for BudgetPool {}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| cuda_error(format!("{what}: {e}")))
}

/// Make `ctx` current on this thread. cudarc reports here an error the GPU recorded earlier (a
/// failed free, an asynchronous fault), so the message says so rather than blaming the binding.
fn bind(ctx: &CudaContext) -> Result<()> {
    ctx.bind_to_thread()
        .map_err(|e| cuda_error(format!("the GPU reported an error: {e}")))
}

/// Pinned device memory on GPU `ordinal`, as pools and allocations describe it.
fn device_location(ordinal: i32) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    }
}

/// The smallest granule the driver reserves device memory in on GPU `ordinal`.
fn granularity(ordinal: i32) -> Result<u64> {
    // SAFETY: a plain C struct of integers and a pointer, for which all zeros is a valid value.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location = device_location(ordinal);
    let mut granule: usize = 0;
    // SAFETY: `prop` is initialised and outlives the call; `granule` is an out-parameter.
    check("the GPU's allocation granularity", unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut granule,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    })?;
    Ok(granule.max(1) as u64)
}

impl BudgetPool {
    /// A pool on `ctx`'s GPU that never holds more than `budget` bytes (rounded down to the
    /// GPU's allocation granule).
    pub(crate) fn new(ctx: &Arc<CudaContext>, budget: u64) -> Result<BudgetPool> {
        let what = format!("a GPU memory pool of the Device budget ({})", format_bytes(budget));
        let bad = |detail: String| Error::config(format!("storage.device_budget = {}: {detail}", format_bytes(budget)));
        bind(ctx)?;
        let mut version = 0;
        // SAFETY: an out-parameter the call fills.
        check(&what, unsafe { sys::cuDriverGetVersion(&mut version) })?;
        if version < POOL_MAX_SIZE_DRIVER {
            return Err(bad(format!(
                "the CUDA driver ({}.{}) cannot bound a memory pool (CUDA 12.2 or later can)",
                version / 1000,
                version % 1000 / 10
            )));
        }
        // cudarc frees a slice with cuMemFreeAsync only where the device has memory pools.
        let pools = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
            .map_err(|e| cuda_error(format!("{what}: {e}")))?;
        if pools == 0 {
            return Err(bad(
                "this GPU does not support memory pools, so no budget can bound it".into()
            ));
        }
        let (_free, total) = ctx.mem_get_info().map_err(|e| cuda_error(format!("{what}: {e}")))?;
        if budget > total as u64 {
            return Err(bad(format!("the GPU has {} in all", format_bytes(total as u64))));
        }
        let ordinal =
            i32::try_from(ctx.ordinal()).map_err(|_| cuda_error(format!("{what}: GPU ordinal out of range")))?;
        let granule = granularity(ordinal)?;
        let budget = budget / granule * granule;
        if budget == 0 {
            return Err(bad(format!(
                "below the GPU's allocation granule of {}",
                format_bytes(granule)
            )));
        }
        let size = usize::try_from(budget).map_err(|_| bad("too large for this machine".into()))?;
        // SAFETY: a plain C struct of integers and pointers, for which all zeros is a valid value
        // (no handle types, no security attributes, default usage).
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location = device_location(ordinal);
        props.maxSize = size;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `props` is initialised above and outlives the call; `pool` is an out-parameter.
        check(&what, unsafe { sys::cuMemPoolCreate(&mut pool, &props) })?;
        let made = BudgetPool {
            pool,
            budget,
            ctx: ctx.clone(),
        };
        // Keep what the pool reserved instead of handing it back at every synchronisation (the
        // default threshold, 0): the budget already bounds it, and a step reuses the same sizes.
        let mut keep = budget;
        // SAFETY: the pool is live; the attribute takes a cuuint64_t by pointer.
        check(&what, unsafe {
            sys::cuMemPoolSetAttribute(
                made.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        })?;
        Ok(made)
    }

    /// `bytes` from the pool, ordered on `stream`; refused with an error naming the budget when
    /// the pool cannot grow to hold them.
    pub(crate) fn alloc(&self, stream: sys::CUstream, bytes: usize) -> Result<sys::CUdeviceptr> {
        bind(&self.ctx)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: the pool and the stream are live and belong to the bound context; `ptr` is an
        // out-parameter.
        let r = unsafe { sys::cuMemAllocFromPoolAsync(&mut ptr, bytes, self.pool, stream) };
        if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(self.out_of_memory(bytes as u64));
        }
        check(
            &format!("cannot allocate {} of GPU memory", format_bytes(bytes as u64)),
            r,
        )?;
        Ok(ptr)
    }

    /// Give back an allocation of [`BudgetPool::alloc`] that no slice took over.
    pub(crate) fn free(&self, stream: sys::CUstream, ptr: sys::CUdeviceptr) {
        // Binding hands back an error recorded earlier: free anyway, and put the error back.
        let bound = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from this pool on `stream` and nothing else refers to it.
        let freed = unsafe { sys::cuMemFreeAsync(ptr, stream) }.result();
        self.ctx.record_err(bound);
        self.ctx.record_err(freed);
    }

    /// Why an allocation of `bytes` was refused: the budget, or (the pool still below it) the GPU
    /// itself, whose memory the context, cuBLAS, NCCL and other processes share.
    fn out_of_memory(&self, bytes: u64) -> Error {
        let figure = |v: Option<u64>| v.map_or_else(|| "?".into(), format_bytes);
        let in_use = figure(
            self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
                .ok(),
        );
        let reserved = self
            .attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
            .ok();
        let (asked, budget) = (format_bytes(bytes), format_bytes(self.budget));
        match reserved {
            Some(r) if r.saturating_add(bytes) <= self.budget => {
                let free = self.ctx.mem_get_info().ok().map(|(free, _)| free as u64);
                cuda_error(format!(
                    "the GPU itself is out of memory: {asked} asked for with {in_use} in use and {} reserved of \
                     the Device budget of {budget}, {} free on the GPU (the CUDA context, cuBLAS, NCCL and other \
                     processes take the rest); lower storage.device_budget to what the GPU can give, or free the GPU",
                    format_bytes(r),
                    figure(free)
                ))
            }
            reserved => cuda_error(format!(
                "the Device budget of {budget} on the GPU is exhausted: {asked} asked for with {in_use} in use \
                 ({} reserved); raise storage.device_budget (--device-budget), or train a smaller model (a \
                 step's activations also grow with train.batch)",
                figure(reserved)
            )),
        }
    }

    fn attribute(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: the pool is live; the memory counters are cuuint64_t values written through the
        // pointer.
        check("reading the GPU memory pool's counters", unsafe {
            sys::cuMemPoolGetAttribute(self.pool, attr, (&mut value as *mut u64).cast())
        })?;
        Ok(value)
    }

    /// What the pool holds now and at most so far.
    pub(crate) fn memory(&self) -> Result<GpuMemory> {
        bind(&self.ctx)?;
        Ok(GpuMemory {
            budget: self.budget,
            in_use: self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            peak: self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved_peak: self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }
}

impl Drop for BudgetPool {
    fn drop(&mut self) {
        // Buffers still allocated from the pool keep it alive: the driver destroys it once the
        // last is freed. Binding hands back an error recorded earlier: destroy the pool anyway and
        // put the error back for the context's next user.
        let bound = self.ctx.bind_to_thread();
        // SAFETY: the pool is live and never used after this.
        let destroyed = unsafe { sys::cuMemPoolDestroy(self.pool) }.result();
        self.ctx.record_err(bound);
        self.ctx.record_err(destroyed);
    }
}
