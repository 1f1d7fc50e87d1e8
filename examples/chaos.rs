//! A chaos run from code: a scenario built with `Scenario::builder` (scripted and random faults of
//! actors, the Disk tier and checkpoints), a small job on two in-process workers whose storage
//! budgets keep half of their experts on disk, run under the scenario and undisturbed, and the
//! report.
//!
//! ```text
//! cargo run --release --example chaos
//! ```

use semoe::chaos::{FaultKind, FaultSpec, Moment, Scenario};
use semoe::storage::tiers::ExpertSlot;
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
    // Each worker hosts 2 experts of each of the 2 MoE blocks: the Device tier holds one block's
    // (2 units), the Host tier none, so the other block's experts are read from disk every step.
    let unit = ExpertSlot::bytes_for(config.model.d_model, config.model.d_ff);
    config.storage.device_budget = (2 * unit).to_string();
    config.storage.host_budget = "0".into();

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
        // Scripted: a read of worker 1's Disk tier fails twice with EIO at step 4 (the I/O thread
        // tries it a third time, and it goes through).
        .fault(FaultSpec::disk().worker(1).kind(FaultKind::ReadError).at(4).times(2))
        // Scripted: the checkpoint written after step 8 gets a flipped bit; the run resumes from
        // the one before, as `--resume` would, naming the damaged one.
        .fault(FaultSpec::checkpoint().kind(FaultKind::Corrupt).at(8))
        .build()?;

    let report = chaos::run(&config, &scenario)?;
    print!("{}", report.markdown());
    match report.verdict {
        Verdict::BitwiseEqual { .. } => Ok(()),
        _ => Err(semoe::Error::runtime(report.verdict_line())),
    }
}
