//! A chaos run from code: a scenario built with `Scenario::builder` (scripted and random faults),
//! a small job on two in-process workers, run under the scenario and undisturbed, and the report.
//!
//! ```text
//! cargo run --release --example chaos
//! ```

use semoe::chaos::{FaultSpec, Moment, Scenario};
use semoe::train::chaos::{self, Verdict};
use semoe::train::TrainConfig;
use std::time::Duration;

fn main() -> semoe::Result<()> {
    // A small model, two in-process workers, 12 steps.
    let mut config = TrainConfig::default();
    config.model.d_model = 64;
    config.model.n_layer = 2;
    config.model.n_head = 4;
    config.model.block_size = 32;
    config.model.d_ff = 128;
    config.model.experts = 4;
    config.train.batch = 8;
    config.train.groups = 4;
    config.train.steps = 12;
    config.train.workers = 2;

    let scenario = Scenario::builder()
        .seed(2)
        .deadline(Duration::from_secs(120))
        // Scripted: expert 2 of MoE block 1 panics in the backward pass of step 3.
        .fault(
            FaultSpec::expert()
                .block(1)
                .expert_index(2)
                .panic()
                .at(3)
                .moment(Moment::Backward),
        )
        // Scripted: worker 0's ledger returns an error when it receives the gradients of step 6.
        .fault(FaultSpec::ledger().worker(0).error().at(6))
        // Random: in about one step in ten, some gate returns an error (worker, block and moment
        // drawn from the seed).
        .fault(FaultSpec::gate().error().random(0.1))
        .build()?;

    let report = chaos::run(&config, &scenario)?;
    print!("{}", report.markdown());
    match report.verdict {
        Verdict::BitwiseEqual { .. } => Ok(()),
        _ => Err(semoe::Error::runtime(report.verdict_line())),
    }
}
