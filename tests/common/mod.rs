//! Shared by the runtime tests: a model small enough to train 20 steps in about a second, and
//! bitwise comparison of models.

#![allow(dead_code)] // each test file uses a part

use semoe::model::gpt::Gpt;
use semoe::train::config::TrainConfig;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// 2 MoE blocks of 4 experts (top-2), d_model 32, context 16, batch 8 in 4 groups, 2 threads.
pub fn small_config(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.model.d_model = 32;
    c.model.n_layer = 2;
    c.model.n_head = 2;
    c.model.block_size = 16;
    c.model.d_ff = 64;
    c.model.experts = 4;
    c.model.k = 2;
    c.train.batch = 8;
    c.train.groups = 4;
    c.train.steps = steps;
    c.train.threads = 2;
    c.train.eval_every = 0;
    c.train.checkpoint_every = 0;
    c.optimizer.warmup = 5;
    c
}

/// Every tensor's bits, by name.
pub fn bits(model: &Gpt<f32>) -> Vec<(String, Vec<u32>)> {
    model
        .tensors()
        .into_iter()
        .map(|(n, _, b)| (n, b.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// Fail naming the first tensor and element whose bits differ.
pub fn assert_same(want: &[(String, Vec<u32>)], got: &[(String, Vec<u32>)], what: &str) {
    assert_eq!(want.len(), got.len());
    for ((n, a), (_, b)) in want.iter().zip(got) {
        let diff = a.iter().zip(b).position(|(x, y)| x != y);
        assert!(diff.is_none(), "{what}: tensor {n} differs at element {diff:?}");
    }
}

/// A fresh directory under the system temp dir, removed when dropped (also when a test fails).
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, unique directory named after `test`.
    pub fn new(test: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let unique = format!(
            "semoe-test-{test}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
