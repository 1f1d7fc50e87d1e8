//! semoe: an elastic Mixture-of-Experts training and inference runtime.
//!
//! The crate is organised as DESIGN.md describes: [`kernels`] (compute backends), [`model`] (layers
//! with hand-written forward and backward passes), and [`bench`] (the measurements behind
//! `semoe bench`).
#![warn(missing_docs)]

pub mod actors;
pub mod bench;
pub mod chaos;
pub mod error;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod net;
pub mod storage;
pub mod telemetry;
pub mod train;

pub use error::{Error, Result};
