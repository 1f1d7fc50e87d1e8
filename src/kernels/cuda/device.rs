//! CUDA device discovery through cudarc with dynamic loading: the crate builds and runs without
//! CUDA installed, and every entry point checks that the driver library is present before calling it
//! (cudarc panics on a missing library otherwise).

use crate::error::{Error, Result};
use std::sync::Arc;

/// An opened CUDA device (a primary context on one GPU).
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<cudarc::driver::CudaContext>,
    ordinal: usize,
}

pub(crate) fn cuda_error(detail: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        detail: detail.into(),
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`. Fails with a clear error when the CUDA driver library is missing, no GPU is
    /// visible, or the ordinal is out of range.
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = Self::visible().map_err(|e| cuda_error(format!("cannot open GPU {ordinal}: {e}")))?;
        if ordinal >= count {
            return Err(cuda_error(format!("cannot open GPU {ordinal}: {count} GPU(s) visible")));
        }
        let ctx = guarded("opening a GPU", || cudarc::driver::CudaContext::new(ordinal))?
            .map_err(|e| cuda_error(format!("cannot open GPU {ordinal}: {e}")))?;
        Ok(CudaDevice { ctx, ordinal })
    }

    /// Number of visible CUDA devices (0 when the driver library is missing or fails to start;
    /// [`CudaDevice::visible`] says why).
    pub fn count() -> usize {
        Self::visible().unwrap_or(0)
    }

    /// Number of visible CUDA devices, or why the driver cannot tell (its library missing, or its
    /// start failed: a driver and library of different versions, no permission on the device).
    pub fn visible() -> Result<usize> {
        if !driver_present() {
            return Err(cuda_error("the CUDA driver library (libcuda.so) was not found"));
        }
        guarded("counting the GPUs", cudarc::driver::CudaContext::device_count)?
            .map(|n| n.max(0) as usize)
            .map_err(|e| cuda_error(format!("the CUDA driver failed to start: {e}")))
    }

    /// The device's context (its primary context, shared by every user of this GPU).
    pub(crate) fn context(&self) -> &Arc<cudarc::driver::CudaContext> {
        &self.ctx
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| format!("cuda:{}", self.ordinal))
    }
}

/// Run `f`, which calls into a CUDA library through cudarc, turning a panic into an error: cudarc
/// panics when an installed library lacks a function it needs (a partial or mismatched install).
/// The panic's default message is not printed (the error says it), see [`quiet_panics`].
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let caught = quiet_panics(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    caught.map_err(|payload| {
        let why = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        // cudarc's own words for a library or a function it cannot load; any other panic is a
        // defect, reported with where it happened.
        if why.contains("Missing symbol") || why.contains("Unable to dynamically load") {
            cuda_error(format!(
                "{what}: a CUDA library is incomplete or of another version ({why}); check the CUDA installation"
            ))
        } else {
            let at = PANICKED_AT
                .with(|p| p.take())
                .unwrap_or_else(|| "an unknown place".into());
            cuda_error(format!(
                "{what}: an internal error in the GPU code at {at}: {why} (please report it)"
            ))
        }
    })
}

/// [`guarded`] for a fallible `f`: its own error, or the panic's. Every public method of the GPU
/// model (`model::cuda`) runs inside it, because cudarc loads each library function at its first
/// call: one missing from a partial install is found mid-run, not when the GPU opens.
pub(crate) fn guarded_try<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    guarded(what, f)?
}

thread_local! {
    /// Set while [`quiet_panics`] runs on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last silenced panic of this thread happened (file:line), for its error.
    static PANICKED_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` with the panic hook silent on this thread: the hook in place before the first call
/// (the default one prints "thread ... panicked at ...") is wrapped once, process-wide, so that it
/// still runs for every other thread and outside `f`.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(std::cell::Cell::get) {
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
                PANICKED_AT.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = f();
    QUIET.with(|q| q.set(was));
    out
}

fn driver_present() -> bool {
    // SAFETY: the probe dlopens each candidate name of the CUDA driver library and closes it again,
    // which runs that library's initialisers: sound as long as what is installed under the driver's
    // name is the driver (the trust every CUDA program places in it). No symbol is looked up or
    // called, and a panic inside the probe is caught.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_a_cuda_call_is_an_error_naming_it() {
        let err = guarded("opening a GPU", || -> usize { panic!("Missing symbol cuDeviceGet") })
            .expect_err("a panic")
            .to_string();
        assert!(
            err.contains("opening a GPU") && err.contains("Missing symbol cuDeviceGet"),
            "{err}"
        );
        assert_eq!(guarded("adding", || 2 + 2).expect("no panic"), 4);
        let err = guarded_try("a training step on the GPU", || -> Result<()> {
            panic!("Missing symbol cuLaunchKernel")
        })
        .expect_err("a panic")
        .to_string();
        assert!(
            err.contains("a training step on the GPU") && err.contains("Missing symbol cuLaunchKernel"),
            "{err}"
        );
        // Any other panic is a defect of ours, not the installation's: said so, with its place.
        let err = guarded_try("a training step on the GPU", || -> Result<()> {
            let v: Vec<u32> = Vec::new();
            let _ = v[std::hint::black_box(3)];
            Ok(())
        })
        .expect_err("a panic")
        .to_string();
        assert!(
            err.contains("internal error") && err.contains("device.rs:") && !err.contains("CUDA installation"),
            "{err}"
        );
        let err = guarded_try("a step", || -> Result<()> { Err(cuda_error("out of memory")) })
            .expect_err("its own error")
            .to_string();
        assert!(err.contains("out of memory") && !err.contains("incomplete"), "{err}");
    }
}
