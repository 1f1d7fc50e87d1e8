//! Shared by the runtime tests: a model small enough to train 20 steps in about a second.

use semoe::train::config::TrainConfig;

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
