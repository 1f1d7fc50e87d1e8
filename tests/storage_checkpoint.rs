//! Checkpoints on disk: bitwise round trips, the commit protocol (latest, prune, overwrite, crash
//! leftovers) and clear errors for every kind of damage.

mod common;

use common::TempDir;
use std::fs;
use std::path::{Path, PathBuf};

use semoe::storage::checkpoint::{self, NamedTensor, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE};
use semoe::Error;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Owned tensors for a test model; [`Tensors::named`] borrows them for `save`.
struct Tensors(Vec<(String, Vec<usize>, Vec<f32>)>);

impl Tensors {
    fn named(&self) -> Vec<NamedTensor<'_>> {
        self.0
            .iter()
            .map(|(name, shape, data)| NamedTensor::new(name, shape.clone(), data))
            .collect()
    }
}

/// A small model whose values include the awkward ones: NaN with a payload, infinities, -0.0, a
/// subnormal, an empty tensor and a scalar. `seed` makes different versions distinguishable.
fn model(seed: f32) -> Tensors {
    let mut wqkv: Vec<f32> = (0..16 * 48).map(|i| seed + i as f32 * 0.25).collect();
    wqkv[0] = f32::from_bits(0x7fc0_1234); // quiet NaN with a payload
    wqkv[1] = f32::from_bits(0xffa0_0001); // negative NaN, different payload
    wqkv[2] = f32::INFINITY;
    wqkv[3] = f32::NEG_INFINITY;
    wqkv[4] = -0.0;
    wqkv[5] = f32::from_bits(1); // smallest subnormal
    wqkv[6] = f32::MAX;
    Tensors(vec![
        ("h.0.attn.wqkv".into(), vec![16, 48], wqkv),
        ("h.0.ln.gain".into(), vec![16], vec![seed; 16]),
        ("empty".into(), vec![0], vec![]),
        ("empty2d".into(), vec![3, 0], vec![]),
        ("scale".into(), vec![], vec![seed * 2.0]),
    ])
}

/// Adam moments for [`model`].
fn optimizer(seed: f32) -> Tensors {
    Tensors(vec![
        ("m.h.0.attn.wqkv".into(), vec![16, 48], vec![seed * 0.1; 16 * 48]),
        ("v.h.0.attn.wqkv".into(), vec![16, 48], vec![seed * 0.01; 16 * 48]),
        ("m.h.0.ln.gain".into(), vec![16], vec![-seed; 16]),
        ("v.h.0.ln.gain".into(), vec![16], vec![seed; 16]),
    ])
}

fn save(run: &Path, step: u64, seed: f32) -> PathBuf {
    let extra = json!({ "seed": seed, "data_position": step * 7 });
    checkpoint::save(run, step, &model(seed).named(), &optimizer(seed).named(), &extra).expect("save")
}

fn bits(data: &[f32]) -> Vec<u32> {
    data.iter().map(|x| x.to_bits()).collect()
}

/// Asserts that `loaded` holds exactly `expected`, bit for bit.
fn assert_same(loaded: &std::collections::BTreeMap<String, checkpoint::LoadedTensor>, expected: &Tensors) {
    assert_eq!(loaded.len(), expected.0.len());
    for (name, shape, data) in &expected.0 {
        let t = loaded.get(name).unwrap_or_else(|| panic!("tensor {name} missing"));
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(bits(&t.data), bits(data), "{name}");
    }
}

/// The names of hidden entries (temporary or aside directories) in the checkpoints directory.
fn hidden_entries(run: &Path) -> Vec<String> {
    let root = run.join(checkpoint::CHECKPOINTS_DIR);
    let mut names: Vec<String> = fs::read_dir(&root)
        .expect("list checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn steps(run: &Path) -> Vec<u64> {
    checkpoint::list(run)
        .expect("list")
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

/// The error message of `load(dir)`, which must fail with a checkpoint error.
fn load_error(dir: &Path) -> String {
    match checkpoint::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e @ Error::Checkpoint { .. }) => e.to_string(),
        Err(e) => panic!("expected a checkpoint error, got: {e}"),
    }
}

/// Replaces `dir/file` by `bytes` and updates the manifest's length and digest, so that the file
/// passes the integrity checks and reaches the parser.
fn replace_verified(dir: &Path, file: &str, bytes: &[u8]) {
    fs::write(dir.join(file), bytes).expect("write file");
    let manifest_path = dir.join(MANIFEST_FILE);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).expect("read manifest")).expect("parse manifest");
    let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    let files = manifest["files"].as_array_mut().expect("files array");
    let entry = files.iter_mut().find(|f| f["name"] == file).expect("file entry");
    entry["bytes"] = json!(bytes.len());
    entry["sha256"] = json!(digest);
    // Without its own digest it is read as a manifest written before there was one.
    manifest.as_object_mut().expect("an object").remove("manifest_sha256");
    fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("serialize")).expect("write manifest");
}

/// A safetensors image with the given raw JSON header and data bytes.
fn safetensors_image(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut image = (header.len() as u64).to_le_bytes().to_vec();
    image.extend_from_slice(&header);
    image.extend_from_slice(data);
    image
}

#[test]
fn round_trip_is_bitwise() {
    let tmp = TempDir::new("roundtrip");
    let run = tmp.path();
    let extra = json!({ "config": { "d_model": 16 }, "rng": [1, 2, 3], "data_position": 1234 });
    let (m, o) = (model(1.5), optimizer(1.5));
    let dir = checkpoint::save(run, 42, &m.named(), &o.named(), &extra).expect("save");
    assert_eq!(dir, run.join("checkpoints").join("step-00000042"));
    assert_eq!(dir, checkpoint::checkpoint_dir(run, 42));
    assert!(hidden_entries(run).is_empty(), "save left {:?}", hidden_entries(run));

    let ckpt = checkpoint::load(&dir).expect("load");
    assert_eq!(ckpt.step, 42);
    assert_eq!(ckpt.dir, dir);
    assert_eq!(ckpt.extra, extra);
    assert_same(&ckpt.model, &m);
    assert_same(&ckpt.optimizer, &o);

    // Standard safetensors with our metadata, readable by any safetensors reader.
    let bytes = fs::read(dir.join(MODEL_FILE)).expect("read model");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("standard safetensors");
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("semoe")
    );

    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).expect("read manifest")).expect("json");
    assert_eq!(manifest["format_version"], 1);
    assert_eq!(manifest["step"], 42);
    assert_eq!(manifest["files"][0]["name"], MODEL_FILE);
    assert_eq!(manifest["files"][0]["bytes"], bytes.len());
    assert_eq!(manifest["files"][1]["name"], OPTIMIZER_FILE);
}

#[test]
fn optimizer_state_is_optional() {
    let tmp = TempDir::new("noopt");
    let m = model(2.0);
    let dir = checkpoint::save(tmp.path(), 1, &m.named(), &[], &serde_json::Value::Null).expect("save");
    assert!(!dir.join(OPTIMIZER_FILE).exists());
    let ckpt = checkpoint::load(&dir).expect("load");
    assert!(ckpt.optimizer.is_empty());
    assert_eq!(ckpt.extra, serde_json::Value::Null);
    assert_same(&ckpt.model, &m);
}

#[test]
fn latest_picks_newest_complete_checkpoint() {
    let tmp = TempDir::new("latest");
    let run = tmp.path();
    assert_eq!(checkpoint::latest(run).expect("latest of empty run"), None);

    save(run, 9, 1.0);
    save(run, 10, 2.0);
    let newest = save(run, 123_456_789, 3.0); // 9 digits: order must be numeric, not by name length
    let root = run.join("checkpoints");

    // A newer temporary directory, even one holding a manifest, is not a checkpoint.
    let tmp_dir = root.join(".step-999999999.tmp-1");
    fs::create_dir(&tmp_dir).expect("mkdir");
    fs::copy(newest.join(MANIFEST_FILE), tmp_dir.join(MANIFEST_FILE)).expect("copy manifest");
    // Newer directories without a manifest, with a garbage manifest, and with a manifest whose
    // step disagrees with the name are not either.
    fs::create_dir(root.join("step-999999998")).expect("mkdir");
    fs::write(root.join("step-999999998").join(MODEL_FILE), b"partial").expect("write");
    fs::create_dir(root.join("step-999999997")).expect("mkdir");
    fs::write(root.join("step-999999997").join(MANIFEST_FILE), b"{ not json").expect("write");
    fs::create_dir(root.join("step-999999996")).expect("mkdir");
    fs::copy(
        newest.join(MANIFEST_FILE),
        root.join("step-999999996").join(MANIFEST_FILE),
    )
    .expect("copy");
    // Unrelated files and directories are ignored.
    fs::write(root.join("step-999999995"), b"a file, not a directory").expect("write");
    fs::create_dir(root.join("notes")).expect("mkdir");

    assert_eq!(checkpoint::latest(run).expect("latest"), Some(newest));
    assert_eq!(steps(run), vec![9, 10, 123_456_789]);
}

#[test]
fn prune_keeps_the_newest_n() {
    let tmp = TempDir::new("prune");
    let run = tmp.path();
    checkpoint::prune(run, 2).expect("prune of an empty run");
    for step in [100, 200, 300, 400, 500] {
        save(run, step, step as f32);
    }
    let incomplete = run.join("checkpoints").join("step-00000050");
    fs::create_dir(&incomplete).expect("mkdir");

    checkpoint::prune(run, 3).expect("prune");
    assert_eq!(steps(run), vec![300, 400, 500]);
    assert!(
        !incomplete.exists(),
        "prune should remove directories without a manifest"
    );
    assert!(!run.join("checkpoints").join("step-00000100").exists());
    checkpoint::load(&checkpoint::checkpoint_dir(run, 300)).expect("kept checkpoints stay loadable");

    checkpoint::prune(run, 10).expect("prune keeping more than exist");
    assert_eq!(steps(run), vec![300, 400, 500]);
    checkpoint::prune(run, 0).expect("prune all");
    assert_eq!(steps(run), Vec::<u64>::new());
    assert_eq!(checkpoint::latest(run).expect("latest"), None);
}

#[test]
fn flipped_byte_is_a_checksum_error_naming_the_file() {
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let tmp = TempDir::new("corrupt");
        let dir = save(tmp.path(), 3, 1.0);
        let path = dir.join(file);
        let mut bytes = fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&path, &bytes).expect("write");

        let msg = load_error(&dir);
        assert!(msg.contains(file) && msg.contains("corrupt: SHA-256 mismatch"), "{msg}");
        // The damage is reported, not skipped: latest() still points at the checkpoint.
        assert_eq!(checkpoint::latest(tmp.path()).expect("latest"), Some(dir.clone()));
        // The model alone (generation) reads and verifies the model file only.
        match checkpoint::load_model_only(&dir) {
            Ok(ckpt) => {
                assert_eq!(file, OPTIMIZER_FILE, "a damaged model file loaded");
                assert_same(&ckpt.model, &model(1.0));
                assert!(ckpt.optimizer.is_empty(), "the optimizer state is not read");
                let resolved = checkpoint::newest_intact_model(tmp.path()).expect("resolve");
                assert_eq!(resolved.checkpoint.map(|c| c.dir), Some(dir));
                assert!(resolved.damaged.is_empty());
            }
            Err(e) => {
                assert_eq!(file, MODEL_FILE, "{e}");
                assert!(e.to_string().contains("corrupt: SHA-256 mismatch"), "{e}");
            }
        }
    }
}

#[test]
fn truncated_file_is_a_length_error() {
    let tmp = TempDir::new("truncated");
    let dir = save(tmp.path(), 3, 1.0);
    let path = dir.join(MODEL_FILE);
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() - 10]).expect("write");
    let msg = load_error(&dir);
    assert!(msg.contains(MODEL_FILE) && msg.contains("truncated"), "{msg}");

    fs::remove_file(&path).expect("remove");
    let msg = load_error(&dir);
    assert!(msg.contains(MODEL_FILE) && msg.contains("missing"), "{msg}");
}

/// What is not a regular file in a checkpoint (a FIFO nobody writes, a link to a device that
/// never ends) is damage, found at once: the open of a FIFO used to wait for ever, and a manifest
/// linked to `/dev/zero` was read until memory ran out.
#[test]
fn special_files_in_a_checkpoint_are_damage_not_a_hang() {
    let tmp = TempDir::new("special");
    let cases = [
        ("fifo-model", MODEL_FILE, None),
        ("fifo-manifest", MANIFEST_FILE, None),
        ("zero-manifest", MANIFEST_FILE, Some("/dev/zero")),
    ];
    for (case, file, target) in cases {
        let dir = save(&tmp.path().join(case), 3, 1.0);
        let path = dir.join(file);
        fs::remove_file(&path).expect("remove");
        match target {
            Some(device) => std::os::unix::fs::symlink(device, &path).expect("symlink"),
            None => {
                let c = std::ffi::CString::new(path.to_str().expect("utf-8 path")).expect("path");
                // SAFETY: mkfifo(3) on a NUL-terminated path the test owns.
                assert_eq!(
                    unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
                    0,
                    "mkfifo {}",
                    path.display()
                );
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let loading = dir.clone();
        std::thread::spawn(move || {
            let _ = tx.send(load_error(&loading));
        });
        let msg = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{case}: the load did not end"));
        assert!(
            msg.contains(file) && msg.contains("not a regular file"),
            "{case}: {msg}"
        );
    }
}

#[test]
fn bad_manifests_are_clear_errors() {
    let tmp = TempDir::new("manifest");
    let dir = save(tmp.path(), 3, 1.0);
    let manifest = dir.join(MANIFEST_FILE);
    let original = fs::read(&manifest).expect("read");

    fs::write(&manifest, b"\x00\x01 garbage").expect("write");
    let msg = load_error(&dir);
    assert!(msg.contains(MANIFEST_FILE) && msg.contains("not valid JSON"), "{msg}");

    let mut value: serde_json::Value = serde_json::from_slice(&original).expect("json");
    value["format_version"] = json!(2);
    fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    // Not damage (another semoe wrote it): a config error, which no reader passes over.
    let msg = match checkpoint::load(&dir) {
        Err(e @ Error::Config(_)) => e.to_string(),
        Err(e) => panic!("expected a config error, got: {e}"),
        Ok(_) => panic!("a manifest of format_version 2 loaded"),
    };
    assert!(msg.contains("unsupported manifest format_version 2"), "{msg}");
    assert!(msg.contains(MANIFEST_FILE), "{msg}");

    // A value of the manifest changed after the save (a flipped digit of the recorded config, of
    // the step) no longer matches the manifest's own digest: damage, as a data file's would be.
    value["format_version"] = json!(1);
    for (key, changed) in [
        ("extra", json!({ "seed": 1.0, "data_position": 22 })),
        ("step", json!(4)),
    ] {
        let mut damaged = value.clone();
        damaged[key] = changed;
        fs::write(&manifest, serde_json::to_vec(&damaged).expect("ser")).expect("write");
        let msg = load_error(&dir);
        assert!(msg.contains("manifest does not match its own SHA-256"), "{key}: {msg}");
    }
    // Unchanged, reformatted: still its own.
    fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    checkpoint::load(&dir).expect("the same manifest, compact");
    // Floats of 17 significant digits (a run's seconds) read back to the same bits, so the
    // digest of a manifest read back is the digest it was saved with.
    for seconds in [1.0 + 41_000_123.0 / 1e9, 0.1 + 0.2, 1e-23, f64::MAX, 5e-324] {
        let odd = tmp.path().join(format!("odd-{seconds:e}"));
        let extra = json!({ "training_seconds": seconds });
        let saved = checkpoint::save(&odd, 1, &model(1.0).named(), &[], &extra).expect("save");
        checkpoint::load(&saved).unwrap_or_else(|e| panic!("{seconds:e}: {e}"));
        assert_eq!(checkpoint::list(&odd).expect("list").len(), 1, "{seconds:e}");
    }
    // Without the digest (a manifest written before it existed), its other checks apply.
    value.as_object_mut().expect("an object").remove("manifest_sha256");
    fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    checkpoint::load(&dir).expect("a manifest without its digest");
    value["files"] = json!([{ "name": "../escape", "bytes": 1, "sha256": "00" }]);
    fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    let msg = load_error(&dir);
    assert!(msg.contains("unknown file"), "{msg}");

    value["files"] = json!("not a list");
    fs::write(&manifest, serde_json::to_vec(&value).expect("ser")).expect("write");
    let msg = load_error(&dir);
    assert!(msg.contains("malformed"), "{msg}");

    fs::remove_file(&manifest).expect("remove");
    let msg = load_error(&dir);
    assert!(msg.contains("not a complete checkpoint"), "{msg}");

    let msg = load_error(&tmp.path().join("no-such-checkpoint"));
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn non_f32_and_duplicate_tensors_are_rejected() {
    let tmp = TempDir::new("dtype");
    let dir = save(tmp.path(), 3, 1.0);

    let f64_file = safetensors_image(r#"{"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#, &[0; 8]);
    replace_verified(&dir, MODEL_FILE, &f64_file);
    let msg = load_error(&dir);
    assert!(
        msg.contains(MODEL_FILE) && msg.contains("tensor x has dtype F64, expected F32"),
        "{msg}"
    );

    let duplicate = safetensors_image(
        concat!(
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
            r#""x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        ),
        &[0; 8],
    );
    replace_verified(&dir, MODEL_FILE, &duplicate);
    let msg = load_error(&dir);
    assert!(msg.contains("duplicate tensor name \"x\""), "{msg}");

    replace_verified(&dir, MODEL_FILE, b"not safetensors at all");
    let msg = load_error(&dir);
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn invalid_inputs_are_rejected_before_writing() {
    let tmp = TempDir::new("inputs");
    let run = tmp.path();
    let data = [1.0f32; 6];
    let null = serde_json::Value::Null;

    let dup = [NamedTensor::new("w", [6], &data), NamedTensor::new("w", [2, 3], &data)];
    let err = checkpoint::save(run, 1, &dup, &[], &null).expect_err("duplicate names");
    assert!(err.to_string().contains("duplicate tensor name"), "{err}");

    let wrong = [NamedTensor::new("w", [4, 2], &data)];
    let err = checkpoint::save(run, 1, &[], &wrong, &null).expect_err("shape mismatch");
    assert!(
        err.to_string().contains("[4, 2]") && err.to_string().contains("6 data elements"),
        "{err}"
    );

    assert!(
        !run.join("checkpoints").exists(),
        "nothing may be written for invalid input"
    );
}

#[test]
fn take_model_checks_names_and_shapes() {
    let tmp = TempDir::new("take");
    let dir = save(tmp.path(), 3, 1.0);
    let mut ckpt = checkpoint::load(&dir).expect("load");

    let err = ckpt.take_model("h.0.attn.wqkv", &[16, 96]).expect_err("wrong shape");
    let msg = err.to_string();
    assert!(
        msg.contains("tensor h.0.attn.wqkv has shape [16, 48], expected [16, 96]"),
        "{msg}"
    );
    assert!(msg.contains(MODEL_FILE), "{msg}");

    let err = ckpt.take_model("h.1.attn.wqkv", &[16, 48]).expect_err("missing");
    assert!(err.to_string().contains("tensor h.1.attn.wqkv is missing"), "{err}");

    // A failed take leaves the tensor in place; a successful one moves it out.
    let data = ckpt.take_model("h.0.attn.wqkv", &[16, 48]).expect("take");
    assert_eq!(bits(&data), bits(&model(1.0).0[0].2));
    assert!(!ckpt.model.contains_key("h.0.attn.wqkv"));
    let err = ckpt.take_model("h.0.attn.wqkv", &[16, 48]).expect_err("taken twice");
    assert!(err.to_string().contains("is missing"), "{err}");

    assert_eq!(
        ckpt.take_model("empty2d", &[3, 0]).expect("empty tensor"),
        Vec::<f32>::new()
    );
    assert_eq!(ckpt.take_model("scale", &[]).expect("scalar"), vec![2.0]);
    assert_eq!(
        ckpt.take_optimizer("v.h.0.ln.gain", &[16]).expect("optimizer"),
        vec![1.0; 16]
    );
    let err = ckpt.take_optimizer("v.h.0.ln.gain", &[16]).expect_err("taken");
    assert!(err.to_string().contains(OPTIMIZER_FILE), "{err}");
}

#[test]
fn overwriting_a_step_replaces_it() {
    let tmp = TempDir::new("overwrite");
    let run = tmp.path();
    save(run, 7, 1.0);
    save(run, 8, 5.0);
    let dir = save(run, 7, 2.0);
    let ckpt = checkpoint::load(&dir).expect("load");
    assert_same(&ckpt.model, &model(2.0));
    assert_same(&ckpt.optimizer, &optimizer(2.0));
    assert_eq!(ckpt.extra["seed"], 2.0);
    assert!(hidden_entries(run).is_empty(), "save left {:?}", hidden_entries(run));
    assert_eq!(steps(run), vec![7, 8]);

    // Replacing a checkpoint that had optimizer state with one that has none drops the old file.
    let m = model(3.0);
    let dir = checkpoint::save(run, 7, &m.named(), &[], &serde_json::Value::Null).expect("save");
    assert!(!dir.join(OPTIMIZER_FILE).exists());
    assert!(checkpoint::load(&dir).expect("load").optimizer.is_empty());
}

#[test]
fn crash_during_save_leaves_the_previous_checkpoint() {
    let tmp = TempDir::new("crash");
    let run = tmp.path();
    let previous = save(run, 10, 1.0);

    // A save of step 20 that died while writing the model file: a temp dir with a partial file.
    let root = run.join("checkpoints");
    let half = root.join(".step-00000020.tmp-99999");
    fs::create_dir(&half).expect("mkdir");
    let full = fs::read(previous.join(MODEL_FILE)).expect("read");
    fs::write(half.join(MODEL_FILE), &full[..full.len() / 3]).expect("write");

    assert_eq!(checkpoint::latest(run).expect("latest"), Some(previous.clone()));
    let ckpt = checkpoint::load(&previous).expect("previous checkpoint still loads");
    assert_same(&ckpt.model, &model(1.0));

    // The next save cleans the leftover up.
    save(run, 20, 2.0);
    assert!(hidden_entries(run).is_empty(), "leftovers: {:?}", hidden_entries(run));
    assert_eq!(steps(run), vec![10, 20]);
}

#[test]
fn crash_while_replacing_a_step_restores_the_old_copy() {
    let tmp = TempDir::new("replace-crash");
    let run = tmp.path();
    save(run, 5, 1.0);
    let old = save(run, 10, 1.0);

    // Step 10 was being overwritten: the old copy had been renamed aside and the new, complete copy
    // was still under its temporary name when the process died.
    let root = run.join("checkpoints");
    let aside = root.join(".step-00000010.old-99999");
    fs::rename(&old, &aside).expect("rename aside");
    let pending = save(tmp.path().join("other").as_path(), 10, 2.0);
    fs::rename(&pending, root.join(".step-00000010.tmp-99999")).expect("move pending");

    // Hidden directories are never read, so step 5 is the newest complete checkpoint for now.
    assert_eq!(
        checkpoint::latest(run).expect("latest"),
        Some(checkpoint::checkpoint_dir(run, 5))
    );

    // The next save puts the old copy of step 10 back and drops the unfinished new one.
    save(run, 11, 3.0);
    assert!(hidden_entries(run).is_empty(), "leftovers: {:?}", hidden_entries(run));
    assert_eq!(steps(run), vec![5, 10, 11]);
    let ckpt = checkpoint::load(&old).expect("restored checkpoint loads");
    assert_same(&ckpt.model, &model(1.0));
}
