//! The `semoe` command line (the commands themselves are in `cli/`).

// The library's lint header (src/lib.rs), for the binary.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod cli;

use std::process::ExitCode;

/// mimalloc, told at start (see [`keep_freed_pages`]) to keep freed pages mapped, so that the large
/// per-step activation buffers do not page-fault afresh on every step.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, the version libmimalloc-sys builds by default):
/// the option after `mi_option_eager_commit_delay` (14), which the crate does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never give freed memory back to the OS. By default mimalloc returns freed pages after a delay;
/// a training step frees and re-allocates its activations, and the refaults (about 100 thousand
/// in 20 s of the default run, each a fresh zeroed page) cost about 6% of the tokens/s.
fn keep_freed_pages() {
    // SAFETY: sets one of mimalloc's global options; mimalloc reads them at every decision, and
    // setting them is allowed at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    keep_freed_pages();
    match cli::run(cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            semoe::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
