//! Shared by the tests: a model small enough to train 20 steps in about a second, bitwise
//! comparison of models and optimizer state, and tolerance checks that fail on NaN.

#![allow(dead_code)] // each test file uses a part

pub mod procs;

use semoe::model::gpt::Gpt;
use semoe::train::config::TrainConfig;
use semoe::train::optimizer::AdamW;
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

/// Every tensor's bits, by name, then the AdamW state: `m.NAME` and `v.NAME` per tensor (the same
/// order) and `optimizer.step` (the step count as two 32-bit halves), so that [`assert_same`]
/// compares the whole training state.
pub fn state_bits(model: &Gpt<f32>, optimizer: &AdamW) -> Vec<(String, Vec<u32>)> {
    let tensors = model.tensors().len();
    assert_eq!(tensors, optimizer.m.len(), "one first moment per model tensor");
    assert_eq!(tensors, optimizer.v.len(), "one second moment per model tensor");
    semoe::train::chaos::state_bits(model, optimizer)
}

/// [`state_bits`] of a `Trainer`: its model and optimizer state, read back from a checkpoint
/// written now and then removed (a checkpoint stores both exactly; the trainer has no other way to
/// show its optimizer). Writing it may prune the oldest of the run's checkpoints when the run
/// already keeps `train.keep_checkpoints` of them.
pub fn trainer_state_bits(trainer: &mut semoe::train::trainer::Trainer) -> Vec<(String, Vec<u32>)> {
    let checkpoint = trainer.save_checkpoint(0.0).expect("checkpoint");
    let (model, optimizer, _) =
        semoe::train::trainer::load_state(trainer.config(), &checkpoint).expect("load the checkpoint");
    std::fs::remove_dir_all(&checkpoint).expect("remove the checkpoint");
    assert_same(
        &bits(trainer.model().expect("model")),
        &bits(&model),
        "the checkpoint's model",
    );
    state_bits(&model, &optimizer)
}

/// Fail naming the first tensor and element whose bits differ. The tensors must agree in number,
/// order, names and lengths before their values are compared.
pub fn assert_same(want: &[(String, Vec<u32>)], got: &[(String, Vec<u32>)], what: &str) {
    let names = |t: &[(String, Vec<u32>)]| t.iter().map(|(n, b)| (n.clone(), b.len())).collect::<Vec<_>>();
    assert_eq!(names(want), names(got), "{what}: tensor names or lengths differ");
    for ((n, a), (_, b)) in want.iter().zip(got) {
        let diff = a.iter().zip(b).position(|(x, y)| x != y);
        assert!(diff.is_none(), "{what}: tensor {n} differs at element {diff:?}");
    }
}

/// Whether `got` is within `tol` of `want`; false when either is not finite (NaN never passes).
pub fn within(got: f64, want: f64, tol: f64) -> bool {
    got.is_finite() && want.is_finite() && (got - want).abs() <= tol
}

/// Fail unless `got` and `want` are finite and `|got - want| <= tol`.
pub fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        within(got, want, tol),
        "{what}: got {got}, want {want} (|diff| {} > {tol}, or not finite)",
        (got - want).abs()
    );
}

/// Fail unless the slices have the same length and every element pair passes
/// [`assert_close`] with the tolerance `tol(want)`.
pub fn assert_all_close(what: &str, got: &[f64], want: &[f64], tol: impl Fn(f64) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_close(&format!("{what}[{i}]"), g, w, tol(w));
    }
}

/// Fail unless the buffers have the same length and `|got - want| / |want|` (Euclidean norms over
/// the whole buffers) is at most `tol`; a NaN anywhere fails.
pub fn assert_norm_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    let rel = diff.sqrt() / norm.sqrt().max(1e-30);
    assert!(rel <= tol, "{what}: relative difference {rel:e} (tolerance {tol:e})");
}

/// The `.json` files of `tests/golden/DIR`, sorted, after checking that they are exactly `expected`
/// (file stems): a missing or an extra file fails.
pub fn golden_files(dir: &str, expected: &[String]) -> Vec<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut stems: Vec<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    stems.sort();
    assert!(!expected.is_empty(), "no golden cases expected in tests/golden/{dir}");
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(stems, want, "the golden files of tests/golden/{dir}");
    files
}

/// The `file` column of the case table under `heading` in tests/golden/README.md (the first
/// Markdown table after that heading whose header starts with `| file |`).
pub fn readme_cases(heading: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/README.md");
    let text = std::fs::read_to_string(&path).expect("tests/golden/README.md");
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no heading {heading:?}"));
    let mut lines = text[start..].lines().skip_while(|l| !l.starts_with("| file |"));
    assert!(lines.next().is_some(), "README: no case table after {heading:?}");
    lines
        .skip(1) // the | --- | row
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap_or_default().trim().to_string())
        .collect()
}

/// GPU 0, or `None` where no GPU is visible (the reason printed, so a skip says so): a GPU that
/// is visible but fails to open fails the test instead of skipping it.
pub fn gpu_or_skip() -> Option<semoe::kernels::cuda::CudaDevice> {
    use semoe::kernels::cuda::CudaDevice;
    if CudaDevice::count() == 0 {
        match CudaDevice::visible() {
            Err(e) => eprintln!("skipping the GPU part: no CUDA GPU is visible ({e})"),
            Ok(_) => eprintln!("skipping the GPU part: no CUDA GPU is visible"),
        }
        return None;
    }
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) => panic!("a GPU is visible but GPU 0 does not open: {e}"),
    }
}

/// Tensors a chaos verdict compares for the model of `c`: every parameter with both AdamW moments,
/// and the optimizer's step.
pub fn chaos_state_tensors(c: &TrainConfig) -> usize {
    let model = Gpt::<f32>::zeros(&c.model).expect("model");
    3 * model.tensors().len() + 1
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
        // SEMOE_KEEP_TEST_OUTPUT=1 keeps it, to look at what a test wrote (a report's plots, say).
        if std::env::var_os("SEMOE_KEEP_TEST_OUTPUT").is_some() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `semoe chaos --scenario SCENARIO --run-dir RUN_DIR --steps STEPS` with 2 workers on the small
/// model of the chaos tests (2 MoE blocks of 4 experts, d_model 32, context 16, batch 8 in 4
/// groups), then `extra` options; at most [`CHAOS_COMMAND_LIMIT`], its output kept next to
/// `run_dir`, the process group killed if the test fails while it runs.
pub fn chaos_command(scenario: &Path, run_dir: &Path, steps: &str, extra: &[&str]) -> std::process::Output {
    let scratch = run_dir.parent().expect("a run directory inside the test's directory");
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    procs::output_within(
        scratch,
        &format!("{name}.chaos"),
        &chaos_args(scenario, run_dir, steps, extra),
        CHAOS_COMMAND_LIMIT,
    )
}

/// How long a `semoe chaos` run of the tests' small model may take (its runs take seconds; a soak
/// of three seeds on a loaded CI machine well under a minute).
pub const CHAOS_COMMAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The arguments of [`chaos_command`] (for a test that starts and bounds the process itself).
pub fn chaos_args(scenario: &Path, run_dir: &Path, steps: &str, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["chaos".into(), "--scenario".into(), scenario.into()];
    args.push("--run-dir".into());
    args.push(run_dir.into());
    // Two in-process workers, unless the job runs over worker processes (one worker each).
    let workers: &[&str] = if extra.contains(&"--processes") {
        &[]
    } else {
        &["--workers", "2"]
    };
    for a in ["--steps", steps]
        .into_iter()
        .chain(workers.iter().copied())
        .chain([
            "--d-model",
            "32",
            "--layers",
            "2",
            "--heads",
            "2",
            "--block-size",
            "16",
            "--d-ff",
            "64",
            "--experts",
            "4",
            "--k",
            "2",
            "--batch",
            "8",
            "--groups",
            "4",
        ])
        .chain(extra.iter().copied())
    {
        args.push(a.into());
    }
    args
}

/// Every scenario text of `cases` is refused with an error that names its key.
pub fn assert_scenarios_refused(cases: &[(String, &str)]) {
    for (text, key) in cases {
        let err = semoe::chaos::Scenario::from_toml(text).expect_err(text).to_string();
        assert!(err.contains(key), "the error for\n{text}\ndoes not name {key}: {err}");
    }
}

/// Train `config` on 2 in-process workers with `deadline`, worker 1 silent from step 2 on, until a
/// step fails: the error, the failing step, and how long that step took from its call to its
/// error (building the runtime and the steps before it are not the deadline's business).
pub fn run_with_a_silent_worker(
    config: TrainConfig,
    deadline: std::time::Duration,
) -> (semoe::Error, u64, std::time::Duration) {
    use semoe::chaos::{FaultKind, FaultPlan, Moment, Target};
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let mut failing = None;
    let err = tokio
        .block_on(async {
            let rt = semoe::actors::Runtime::builder(config)
                .workers(2)
                .deadline(deadline)
                .chaos(FaultPlan::none().with(Target::Silence { worker: 1 }, 2, Moment::Any, FaultKind::Error))
                .build()
                .await?;
            for step in 0..4 {
                let started = std::time::Instant::now();
                if let Err(e) = rt.step().await {
                    failing = Some((step, started.elapsed()));
                    return Err(e);
                }
            }
            rt.shutdown().await
        })
        .expect_err("worker 1 is silent from step 2 on");
    let (step, took) = failing.expect("a step failed");
    (err, step, took)
}

/// What a runtime ended with after [`train_steps`].
pub struct Trained {
    /// The bits of the model and the optimizer state (moments and step).
    pub bits: Vec<(String, Vec<u32>)>,
    /// Replays the steps reported.
    pub replays: u32,
    /// Generations of lane communicators built (expert rows over collectives), else `None`.
    pub generations: Option<u64>,
}

/// Run `steps` steps on the runtime `builder` makes, with `plan`'s faults (which must all fire),
/// then shut it down.
pub async fn train_steps(
    builder: semoe::actors::RuntimeBuilder,
    steps: u64,
    plan: &semoe::chaos::FaultPlan,
) -> semoe::Result<Trained> {
    let rt = builder.chaos(plan.clone()).build().await?;
    let mut replays = 0;
    for _ in 0..steps {
        replays += rt.step().await?.replays;
    }
    let generations = rt.communicator_generations();
    let (model, optimizer) = rt.state().await?;
    rt.shutdown().await?;
    assert_eq!(plan.pending(), 0, "every planned fault fired");
    assert_eq!(optimizer.step, steps, "steps committed");
    Ok(Trained {
        bits: state_bits(&model, &optimizer),
        replays,
        generations,
    })
}

/// Run `f` on each of `items` on a thread of its own (the ranks of a communicator, each blocking
/// in its collectives); answer in the items' order.
pub fn on_threads<C: Send, T: Send>(items: Vec<C>, f: impl Fn(&mut C) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|mut item| {
                let f = &f;
                s.spawn(move || f(&mut item))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a thread")).collect()
    })
}
