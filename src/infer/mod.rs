//! Inference: sampling text from a trained model, one sequence or a batch, incrementally (a cache
//! of attention keys and values), with the weights in memory or streamed through a ring of memory
//! sections under a budget.

pub mod batch;
pub mod decoder;
pub mod generate;
pub mod mapped;
pub mod model_file;
pub mod ring;
pub mod weights;

pub use batch::{BatchDecoder, Decode, Emitted, SeqId, StepOutcome};
pub use generate::{generate, generate_recomputing, generate_with, SampleOptions};
pub use model_file::ModelFile;
pub use ring::{Prefetch, RingLoad, RingOptions, RingStats, RingWeights};
