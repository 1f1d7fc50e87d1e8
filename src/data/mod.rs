//! Training text and how it is cut into batches: the corpus (the bundled Shakespeare text or a
//! user's files, split into training and validation bytes) and the sampler (the windows of a step
//! and group, a pure function of seed, step and group, so any worker can sample any group).

pub mod corpus;
pub mod sampler;

pub use corpus::{read_text, Corpus};
