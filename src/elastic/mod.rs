//! Elastic training across processes: a coordinator and worker processes joined by QUIC.
pub mod cluster;
pub mod fingerprint;
pub mod handover;
pub mod hooks;
pub mod protocol;
pub mod proxy;
pub mod runtime;
pub mod worker;
