//! Elastic training across processes: a coordinator and worker processes joined by QUIC.
pub mod cluster;
pub mod comm_ids;
pub mod fingerprint;
pub mod handover;
pub mod hooks;
pub mod protocol;
pub mod proxy;
pub mod runtime;
pub mod worker;

/// Async threads of a worker process and of the coordinator of worker processes. They move
/// messages, encrypt and decode; the compute threads take every core. On a machine of up to
/// four cores one async thread per process is the faster choice: with two, each process's pair
/// woke each other and competed with the compute threads (`semoe bench runtime --workers 2
/// --processes 2` on two cores: 73-77% of the in-process runtime with two, 78-81% with one;
/// BENCHMARKS.md, session 16). On larger machines a second one carries QUIC's encryption for
/// many peers without taking a compute core's time (not measured here).
pub(crate) fn async_threads() -> usize {
    if crate::kernels::cpu::cores() <= 4 {
        1
    } else {
        2
    }
}
