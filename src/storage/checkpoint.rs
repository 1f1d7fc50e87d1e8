//! Crash-safe training checkpoints: parameters and optimizer state as safetensors, plus a manifest.
//!
//! # On-disk layout
//!
//! ```text
//! <run_dir>/checkpoints/
//!     step-00001000/                 a complete checkpoint (8-digit zero-padded step)
//!         model.safetensors          parameters, named f32 tensors, metadata {"format": "semoe"}
//!         optimizer.safetensors      optimizer state (e.g. `m.<name>`, `v.<name>`); absent if none
//!         manifest.json              the commit record, written last
//!     step-00002000/
//!     .step-00003000.tmp-4242        a save in progress (or interrupted by a crash): never read
//!     .step-00002000.old-4242        the previous copy of a step being overwritten: never read
//! ```
//!
//! `manifest.json` holds `format_version` (1), `step`, `files` (for each data file its `name`,
//! length in `bytes` and `sha256` hex digest), `extra`, a JSON value owned by the caller
//! (configuration, data position, RNG state, ...) that this module stores without looking at it,
//! and `manifest_sha256`, the SHA-256 of the manifest's compact JSON without that field (damage to
//! the manifest itself is caught as damage to a data file is; a manifest without it, written
//! before it existed, is read as before).
//!
//! The tensor files are plain safetensors (little-endian f32, C order), so PyTorch can read them
//! with `safetensors.torch.load_file` and nothing semoe-specific.
//!
//! # Commit protocol
//!
//! A checkpoint directory exists under its final name only once it is complete, so a crash at any
//! point leaves either the previous checkpoints or the new, complete one:
//!
//! 1. every file is written into a hidden sibling directory `.step-NNNNNNNN.tmp-<pid>` with
//!    create + write + `sync_all`, `manifest.json` last, then that directory is fsynced;
//! 2. the directory is renamed to `step-NNNNNNNN` (an atomic operation on POSIX file systems), and
//!    the `checkpoints` directory is fsynced so that the rename itself is durable;
//! 3. if `step-NNNNNNNN` already existed, it is first renamed aside to `.step-NNNNNNNN.old-<pid>`
//!    and deleted only after the new one is in place. A crash between those two renames leaves the
//!    old copy under the aside name, and the next [`save`] renames it back.
//!
//! Readers trust only what the manifest describes: [`latest`] considers only `step-*` directories
//! with a valid manifest, and [`load`] checks each file's length and SHA-256 against the manifest
//! before parsing it, so a torn write or a flipped bit is reported instead of being trained on.
//! Hidden leftovers of an interrupted save are removed by the next [`save`].
//!
//! One process writes a run directory's checkpoints at a time (in data-parallel training, rank 0):
//! the cleanup in [`save`] removes every leftover temporary directory, including another writer's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors, View};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The version of the manifest format that this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// The directory under a run directory that holds its checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The parameter file of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer-state file of a checkpoint (present only if the optimizer state is not empty).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The commit record of a checkpoint, written last.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A test hook for `tests/storage_crash.rs`, read once per process: when this environment variable
/// holds a number of milliseconds, every tensor file write stops halfway, prints
/// `semoe: pausing in a checkpoint write (...)` to stderr and sleeps that long before finishing.
/// Unset (or not a number), nothing changes.
pub const PAUSE_IN_WRITE_ENV: &str = "SEMOE_PAUSE_IN_CHECKPOINT_WRITE";

/// The key that safetensors reserves in its header for free-form metadata; no tensor may use it.
const SAFETENSORS_METADATA_KEY: &str = "__metadata__";

/// A tensor to save: a name, a shape, and its elements in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor<'a> {
    /// The tensor's name in the file (e.g. `h.0.attn.wqkv`); unique within a file.
    pub name: &'a str,
    /// The shape; the product of its dimensions must equal `data.len()` (`[]` is a scalar).
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: &'a [f32],
}

impl<'a> NamedTensor<'a> {
    /// A tensor named `name` with the given shape and data.
    pub fn new(name: &'a str, shape: impl Into<Vec<usize>>, data: &'a [f32]) -> Self {
        NamedTensor {
            name,
            shape: shape.into(),
            data,
        }
    }
}

/// A tensor read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedTensor {
    /// The shape as stored.
    pub shape: Vec<usize>,
    /// The elements, row-major, bit for bit as saved (NaN payloads and -0.0 included).
    pub data: Vec<f32>,
}

/// A loaded checkpoint whose files matched their manifest.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The training step the checkpoint was taken at (from the manifest).
    pub step: u64,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The parameters, by name.
    pub model: BTreeMap<String, LoadedTensor>,
    /// The optimizer state, by name; empty if the checkpoint has none.
    pub optimizer: BTreeMap<String, LoadedTensor>,
    /// The caller's `extra` value, as saved.
    pub extra: serde_json::Value,
}

impl Checkpoint {
    /// Removes parameter `name` from the checkpoint and returns its data, after checking that its
    /// shape is `expected_shape`. Taking tensors out (instead of cloning them) keeps peak memory at
    /// one copy of the model while the caller fills its own buffers, and lets the caller check that
    /// nothing is left over in [`Checkpoint::model`] afterwards.
    pub fn take_model(&mut self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let path = self.dir.join(MODEL_FILE);
        take_tensor(&mut self.model, &path, name, expected_shape)
    }

    /// Like [`Checkpoint::take_model`], for optimizer state.
    pub fn take_optimizer(&mut self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let path = self.dir.join(OPTIMIZER_FILE);
        take_tensor(&mut self.optimizer, &path, name, expected_shape)
    }
}

fn take_tensor(
    map: &mut BTreeMap<String, LoadedTensor>,
    path: &Path,
    name: &str,
    expected_shape: &[usize],
) -> Result<Vec<f32>> {
    let Some(tensor) = map.get(name) else {
        return Err(Error::checkpoint(
            path,
            format!("tensor {name} is missing ({} other tensors are present)", map.len()),
        ));
    };
    if tensor.shape != expected_shape {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor {name} has shape {:?}, expected {expected_shape:?}",
                tensor.shape
            ),
        ));
    }
    Ok(map.remove(name).map(|t| t.data).unwrap_or_default())
}

/// The name of the directory of the checkpoint at `step`: `step-` and the step, zero-padded to 8
/// digits so that a plain directory listing sorts by step (longer steps still parse).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The directory that [`save`] writes the checkpoint at `step` of `run_dir` to.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR).join(step_dir_name(step))
}

/// The step of a final checkpoint directory name (`step-<digits>`), or `None` for anything else,
/// in particular the hidden temporary and aside directories.
fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the manifest says about one data file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    sha256: String,
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format_version: u64,
    step: u64,
    files: Vec<FileEntry>,
    #[serde(default)]
    extra: serde_json::Value,
    /// SHA-256 of the manifest itself ([`Manifest::digest`]): the data files' digests cover the
    /// tensors, this one the step, the file list and `extra` (the run's config: a flipped digit
    /// there would load silently as another model). Absent in manifests written before it, which
    /// are read as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    manifest_sha256: Option<String>,
}

impl Manifest {
    /// The digest of this manifest without its own digest field: of its compact JSON (struct
    /// fields in declaration order, `extra`'s keys sorted, numbers in their shortest round-trip
    /// form, so the same manifest read back gives the same bytes).
    fn digest(&self) -> Result<String> {
        let unsigned = Manifest {
            manifest_sha256: None,
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&unsigned)
            .map_err(|e| Error::runtime(format!("cannot serialize a checkpoint manifest: {e}")))?;
        Ok(sha256_hex(&bytes))
    }
}

/// Writes a checkpoint of `step` under `run_dir/checkpoints/` and returns its directory.
///
/// `optimizer` may be empty, in which case no optimizer file is written. Tensor names must be
/// unique within each slice, and each shape must match its data length; these are checked before
/// anything is written. An existing checkpoint of the same step is replaced (see the module
/// documentation for how this stays crash-safe). Leftovers of interrupted saves are cleaned first.
pub fn save(
    run_dir: &Path,
    step: u64,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
    extra: &serde_json::Value,
) -> Result<PathBuf> {
    save_interrupted(run_dir, step, model, optimizer, extra, None)
}

/// An injected interruption of a checkpoint save (chaos runs): the data file `file` is written
/// halfway, then the save fails with `error`, as a writer that dies or whose disk fails there
/// would. The save's own failure path runs as for any error: the temporary directory is removed
/// and no `step-*` directory is created or replaced.
#[derive(Debug)]
pub struct Interruption {
    /// The data file to cut ([`MODEL_FILE`] or [`OPTIMIZER_FILE`]).
    pub file: &'static str,
    /// The error the save fails with.
    pub error: io::Error,
}

/// [`save`], interrupted as `interruption` says (`None`: not at all).
pub fn save_interrupted(
    run_dir: &Path,
    step: u64,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
    extra: &serde_json::Value,
    interruption: Option<Interruption>,
) -> Result<PathBuf> {
    check_tensors(MODEL_FILE, model)?;
    check_tensors(OPTIMIZER_FILE, optimizer)?;

    let root = run_dir.join(CHECKPOINTS_DIR);
    create_dir_synced(&root)?;
    clean_leftovers(&root)?;

    let name = step_dir_name(step);
    let final_dir = root.join(&name);
    let tmp_dir = root.join(format!(".{name}.tmp-{}", std::process::id()));
    fs::create_dir(&tmp_dir).map_err(|e| Error::io("creating temporary checkpoint directory", &tmp_dir, e))?;

    // On failure, the half-written temporary directory is removed right away (best effort: the
    // next save removes it anyway, and the write error matters more than a failed cleanup).
    let written = write_contents(&tmp_dir, step, model, optimizer, extra, interruption);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }

    commit(&root, &tmp_dir, &final_dir)?;
    Ok(final_dir)
}

/// Checks names and shapes of the tensors for one file, so that a bad input fails before any I/O.
fn check_tensors(file: &str, tensors: &[NamedTensor]) -> Result<()> {
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        let context = format!("checkpoint {file}, tensor {:?}", t.name);
        if t.name.is_empty() || t.name == SAFETENSORS_METADATA_KEY {
            return Err(Error::shape(context, "invalid tensor name"));
        }
        if !seen.insert(t.name) {
            return Err(Error::shape(context, "duplicate tensor name"));
        }
        let elements = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elements != Some(t.data.len()) {
            return Err(Error::shape(
                context,
                format!("shape {:?} does not match {} data elements", t.shape, t.data.len()),
            ));
        }
    }
    Ok(())
}

/// Writes the data files and then the manifest into `dir`, and fsyncs `dir`.
fn write_contents(
    dir: &Path,
    step: u64,
    model: &[NamedTensor],
    optimizer: &[NamedTensor],
    extra: &serde_json::Value,
    interruption: Option<Interruption>,
) -> Result<()> {
    let mut cut = interruption;
    let mut cut_at = |file: &str| match &cut {
        Some(i) if i.file == file => cut.take().map(|i| i.error),
        _ => None,
    };
    let mut files = vec![write_tensor_file(dir, MODEL_FILE, model, cut_at(MODEL_FILE))?];
    if !optimizer.is_empty() {
        files.push(write_tensor_file(
            dir,
            OPTIMIZER_FILE,
            optimizer,
            cut_at(OPTIMIZER_FILE),
        )?);
    }
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        step,
        files,
        extra: extra.clone(),
        manifest_sha256: None,
    };
    manifest.manifest_sha256 = Some(manifest.digest()?);
    let manifest_path = dir.join(MANIFEST_FILE);
    let mut bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::checkpoint(&manifest_path, format!("cannot serialize manifest: {e}")))?;
    bytes.push(b'\n');
    write_file_synced(&manifest_path, &bytes, None, None)?;
    sync_dir(dir)
}

/// A borrowed f32 tensor as safetensors' [`View`]. The bytes are produced one tensor at a time
/// during serialization, so saving holds the file image plus at most one tensor's bytes.
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

/// Serializes `tensors` as a safetensors file `dir/name` and returns its manifest entry (with
/// `cut`, writes half of it and fails with that error).
fn write_tensor_file(dir: &Path, name: &str, tensors: &[NamedTensor], cut: Option<io::Error>) -> Result<FileEntry> {
    let path = dir.join(name);
    let views = tensors.iter().map(|t| {
        (
            t.name,
            F32View {
                shape: &t.shape,
                data: t.data,
            },
        )
    });
    let metadata = HashMap::from([("format".to_string(), "semoe".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::checkpoint(&path, format!("cannot serialize tensors: {e}")))?;
    write_file_synced(&path, &bytes, pause_in_write(), cut)?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        sha256: sha256_hex(&bytes),
    })
}

/// The pause of the crash-test hook [`PAUSE_IN_WRITE_ENV`], if set. It exists only so that
/// `tests/storage_crash.rs` can kill `semoe train` in the middle of a checkpoint's disk write and
/// check that the previous checkpoint stays loadable.
fn pause_in_write() -> Option<Duration> {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    *PAUSE.get_or_init(|| {
        let millis = std::env::var(PAUSE_IN_WRITE_ENV).ok()?.trim().parse().ok()?;
        Some(Duration::from_millis(millis))
    })
}

/// Creates `path`, writes `bytes` and forces them to disk before returning, so that the manifest,
/// written after the data files, can never describe data that is not durable yet.
///
/// With `pause` (the crash-test hook), the first half of `bytes` is written, one line is printed
/// to stderr and the thread sleeps before writing the rest: a kill then leaves a torn file in the
/// temporary directory, neither synced nor renamed. With `cut` (an injected interruption), the
/// first half is written and the write fails with that error.
fn write_file_synced(path: &Path, bytes: &[u8], pause: Option<Duration>, cut: Option<io::Error>) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io("creating checkpoint file", path, e))?;
    if let Some(e) = cut {
        file.write_all(&bytes[..bytes.len() / 2])
            .map_err(|e| Error::io("writing checkpoint file", path, e))?;
        return Err(Error::io(
            format!(
                "writing checkpoint file ({} of {} bytes written)",
                bytes.len() / 2,
                bytes.len()
            ),
            path,
            e,
        ));
    }
    let mut rest = bytes;
    if let Some(pause) = pause {
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        file.write_all(head)
            .map_err(|e| Error::io("writing checkpoint file", path, e))?;
        crate::say!(
            "semoe: pausing in a checkpoint write ({} of {} bytes of {} written)",
            head.len(),
            bytes.len(),
            path.display()
        );
        std::thread::sleep(pause);
        rest = tail;
    }
    file.write_all(rest)
        .map_err(|e| Error::io("writing checkpoint file", path, e))?;
    file.sync_all()
        .map_err(|e| Error::io("syncing checkpoint file", path, e))
}

/// Replace the file at `path` with `bytes` so that a crash at any moment leaves either the old
/// content or the new, never a torn file: written under a temporary name in the same directory,
/// synced, renamed over `path`, and the directory synced. For a run directory's small files
/// (`config.toml`, the metrics log when a resume truncates it).
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_durably_with(path, |out| {
        out.write_all(bytes).map_err(|e| Error::io("cannot write", path, e))
    })
}

/// [`write_file_durably`] with the contents written by `fill` (buffered), for contents too
/// large to hold in memory at once (a long run's metrics log).
pub fn write_file_durably_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        fill(&mut out)?;
        let file = out
            .into_inner()
            .map_err(|e| Error::io("cannot write", &tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io("cannot sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("cannot replace", path, e))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Makes the directory entries in `dir` (created, renamed or removed files) durable. Only POSIX
/// systems allow opening a directory for this; elsewhere it is a no-op.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let handle = File::open(dir).map_err(|e| Error::io("opening directory to sync it", dir, e))?;
        handle.sync_all().map_err(|e| Error::io("syncing directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `dir` and those of its ancestors that do not exist yet, outermost first: the directories a
/// `create_dir_all(dir)` makes, whose entries [`sync_parents`] then makes durable.
pub(crate) fn missing_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|at| !at.as_os_str().is_empty() && fs::symlink_metadata(at).is_err())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    missing
}

/// `fs::create_dir_all(dir)`, answering the directories it made (see [`missing_dirs`]), outermost
/// first, for [`sync_parents`].
pub(crate) fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let missing = missing_dirs(dir);
    fs::create_dir_all(dir)?;
    Ok(missing)
}

/// Makes the entries of the directories `created` durable in their parents: a file synced inside
/// a new directory can still vanish in a power loss with the directory, or with a new parent of
/// it, whose own entry was never synced.
pub(crate) fn sync_parents(created: &[PathBuf]) -> Result<()> {
    for dir in created {
        if let Some(parent) = parent_dir(dir) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// The directory holding `path`'s entry: its parent, or the working directory for a relative
/// path of one component (`runs`, whose `parent()` is empty); `None` for a root.
pub(crate) fn parent_dir(path: &Path) -> Option<&Path> {
    match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

/// Creates `dir` (and its parents) if missing, and makes its entry in the parent, and those of
/// the parents it made, durable. Synced also when it exists: a crash between an earlier creation
/// and its sync leaves it unsynced.
fn create_dir_synced(dir: &Path) -> Result<()> {
    let made = create_dirs(dir).map_err(|e| Error::io("creating checkpoints directory", dir, e))?;
    sync_parents(&made)?;
    match parent_dir(dir) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Moves the complete temporary directory `tmp` to `final_dir`, replacing an existing checkpoint
/// of the same step by renaming it aside first: a directory cannot be renamed over a non-empty one,
/// and deleting the old copy before the new one is in place would open a window with neither.
fn commit(root: &Path, tmp: &Path, final_dir: &Path) -> Result<()> {
    let exists = match fs::symlink_metadata(final_dir) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io("inspecting checkpoint directory", final_dir, e)),
    };
    if !exists {
        fs::rename(tmp, final_dir).map_err(|e| Error::io("committing checkpoint (rename)", final_dir, e))?;
        return sync_dir(root);
    }

    // Linux swaps the two directories in one step: no moment without the step, whatever crashes.
    #[cfg(target_os = "linux")]
    if exchange(tmp, final_dir)? {
        sync_dir(root)?;
        // `tmp` now holds the replaced copy. The new one is committed: a copy that cannot be
        // removed now is said, not an error (the next save's tidy-up removes it).
        remove_replaced(tmp);
        return sync_dir(root);
    }

    // Elsewhere (or on a filesystem without the exchange): aside, then in place. A crash between
    // the two renames leaves the old copy aside, which the next save puts back.
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = root.join(format!(".{name}.old-{}", std::process::id()));
    fs::rename(final_dir, &aside).map_err(|e| Error::io("moving replaced checkpoint aside", final_dir, e))?;
    if let Err(e) = fs::rename(tmp, final_dir) {
        // Put the old copy back so that the step stays loadable; the new one stays in `tmp`, where
        // the next save removes it.
        let _ = fs::rename(&aside, final_dir);
        return Err(Error::io("committing checkpoint (rename)", final_dir, e));
    }
    sync_dir(root)?;
    remove_replaced(&aside);
    sync_dir(root)
}

/// Remove the replaced copy of a checkpoint once the new one is committed; a failure is said and
/// left to the next save's tidy-up (the save itself succeeded).
fn remove_replaced(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        crate::say!(
            "warning: the replaced copy {} could not be removed ({e}); the next checkpoint removes it",
            dir.display()
        );
    }
}

/// Swap the directories `a` and `b` atomically (`renameat2` with `RENAME_EXCHANGE`); false when
/// the filesystem or kernel cannot, so that the caller falls back to two renames.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::checkpoint(p, "a checkpoint path holds a NUL byte"))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // The system call, not glibc's wrapper (which only glibc 2.28 and later have).
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; the arguments are
    // those renameat2(2) takes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(Error::io("committing checkpoint (exchange)", b, e)),
    }
}

/// The final name (`step-N`) of a copy a replace renamed aside (`.step-N.old-PID`).
fn aside_of(name: &str) -> Option<&str> {
    let (final_name, _pid) = name.strip_prefix('.')?.split_once(".old-")?;
    parse_step_dir_name(final_name).map(|_| final_name)
}

/// Checkpoints renamed aside by an interrupted replace ([`restore_replaced`] puts them back).
pub fn replaced_aside(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    Ok(read_dir_entries(&root)?
        .into_iter()
        .filter(|(name, _)| aside_of(name).is_some())
        .map(|(_, path)| path)
        .collect())
}

/// Put back each checkpoint that a replace renamed aside and that a crash between its two
/// renames left without a `step-N` (a file system without `RENAME_EXCHANGE`): what a resume must
/// see before it looks for the newest intact checkpoint (only the next save's cleanup did it: a
/// resume went back to an older step). Call it holding the run's lock.
pub fn restore_replaced(run_dir: &Path) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if root.is_dir() {
        tidy(&root, false)?;
    }
    Ok(())
}

/// Removes what interrupted saves left behind in `root`: temporary directories are deleted, and
/// an aside copy whose step has no final directory (a crash between the two renames of a replace)
/// is renamed back, since it is the last complete version of that step.
fn clean_leftovers(root: &Path) -> Result<()> {
    tidy(root, true)
}

/// Rename back each aside copy whose step has no final directory; with `remove`, also delete
/// temporary directories and aside copies whose step has one (what only a save may do: a resume
/// leaves them to it).
fn tidy(root: &Path, remove: bool) -> Result<()> {
    let mut changed = false;
    for (name, path) in read_dir_entries(root)? {
        if let Some(final_name) = aside_of(&name) {
            let final_dir = root.join(final_name);
            if !final_dir.exists() {
                fs::rename(&path, &final_dir).map_err(|e| Error::io("restoring replaced checkpoint", &final_dir, e))?;
                changed = true;
            } else if remove {
                fs::remove_dir_all(&path).map_err(|e| Error::io("removing stale replaced checkpoint", &path, e))?;
                changed = true;
            }
        } else if remove {
            let temporary = name.strip_prefix('.').and_then(|rest| rest.split_once(".tmp-"));
            if temporary.is_some_and(|(final_name, _pid)| parse_step_dir_name(final_name).is_some()) {
                fs::remove_dir_all(&path).map_err(|e| Error::io("removing stale temporary checkpoint", &path, e))?;
                changed = true;
            }
        }
    }
    if changed {
        sync_dir(root)?;
    }
    Ok(())
}

/// The (name, path) of every real directory (not following symbolic links) in `dir`; names that
/// are not UTF-8 cannot be checkpoint names and are skipped.
fn read_dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("listing checkpoints", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing checkpoints", dir, e))?;
        let file_type = entry
            .file_type()
            .map_err(|e| Error::io("inspecting checkpoint entry", entry.path(), e))?;
        if !file_type.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

/// The complete checkpoints of `run_dir`, oldest first, as (step, directory).
///
/// A checkpoint is complete when its directory is named `step-<digits>` and holds a manifest of a
/// supported version whose step matches the name. The data files are not verified here (that
/// would read every checkpoint in full): a committed checkpoint whose files are later damaged is
/// still listed, so that [`load`] reports the damage rather than training silently resuming from
/// an older step.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (name, path) in read_dir_entries(&root)? {
        let Some(step) = parse_step_dir_name(&name) else {
            continue;
        };
        match read_manifest(&path) {
            Ok(manifest) if manifest.step == step => out.push((step, path)),
            // Not listed either: a damaged manifest, or (a config error, the only one
            // `read_manifest` returns) one another version of semoe wrote.
            Ok(_) | Err(Error::Checkpoint { .. }) | Err(Error::Config(_)) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Every `step-*` directory of `run_dir`, oldest first, as (step, directory), whether its
/// checkpoint is complete or not: what a run wrote, or began to write, as a checkpoint.
pub fn step_dirs(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut out = Vec::new();
    if root.is_dir() {
        for (name, path) in read_dir_entries(&root)? {
            if let Some(step) = parse_step_dir_name(&name) {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The directory of the newest complete checkpoint of `run_dir`, or `None` if there is none.
/// Temporary directories and directories without a valid manifest are ignored (see [`list`]).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, dir)| dir))
}

/// A checkpoint directory that [`newest_intact`] passed over, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Damaged {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// What is wrong with it (a missing or invalid manifest, a truncated or corrupt file, ...).
    pub reason: String,
}

/// What [`newest_intact`] found.
#[derive(Debug)]
pub struct Resolved {
    /// The newest checkpoint that loads and verifies, loaded (`None`: there is none).
    pub checkpoint: Option<Checkpoint>,
    /// The `step-*` directories newer than it that did not verify, newest first: each is a
    /// checkpoint the run wrote (or began to write) that cannot be used.
    pub damaged: Vec<Damaged>,
}

/// The newest checkpoint of `run_dir` that verifies in full (manifest, lengths, SHA-256, tensors),
/// loaded, and every newer `step-*` directory that did not verify, with the reason. One rule for
/// every reader: a damaged checkpoint is never used, and never silently skipped either; the caller
/// names each damaged one when it falls back to an older checkpoint.
///
/// I/O errors other than damage (a permission error, say) are returned as errors, not treated as
/// damage; so is a manifest of another format version (a checkpoint another semoe wrote).
pub fn newest_intact(run_dir: &Path) -> Result<Resolved> {
    newest_intact_by(run_dir, load)
}

/// [`newest_intact`] reading and verifying the model part only ([`load_model_only`]): the
/// newest checkpoint whose model generates.
pub fn newest_intact_model(run_dir: &Path) -> Result<Resolved> {
    newest_intact_by(run_dir, load_model_only)
}

/// How often [`newest_intact_by`] lists the checkpoints again when the one it read went away.
const MAX_RELISTS: usize = 8;

fn newest_intact_by(run_dir: &Path, load: impl Fn(&Path) -> Result<Checkpoint>) -> Result<Resolved> {
    let mut candidates = step_dirs(run_dir)?;
    let mut newest_listed = candidates.last().map(|(s, _)| *s);
    let mut damaged: Vec<Damaged> = Vec::new();
    let mut relists = 0;
    while let Some((step, dir)) = candidates.pop() {
        let reason = match load(&dir) {
            Ok(ckpt) if ckpt.step == step => {
                return Ok(Resolved {
                    checkpoint: Some(ckpt),
                    damaged,
                })
            }
            Ok(ckpt) => format!("its manifest says step {}, its name step {step}", ckpt.step),
            Err(Error::Checkpoint { path, detail }) => format!("{}: {detail}", path.display()),
            Err(e) => return Err(e),
        };
        // A reader without the run's lock (`eval`, `generate`) beside a run that trains: the run
        // may have saved a newer checkpoint and pruned this one while it was read (a prune
        // removes the manifest first). That is no damage: list again and read the newest.
        if relists < MAX_RELISTS {
            let now = step_dirs(run_dir)?;
            // Newer than any listed before (a damaged one above this is no reason to list again).
            let newer = now.last().is_some_and(|(s, _)| newest_listed.is_none_or(|n| *s > n));
            if newer || !dir.exists() {
                newest_listed = now.last().map(|(s, _)| *s).max(newest_listed);
                relists += 1;
                if newer {
                    candidates = now
                        .into_iter()
                        .filter(|(_, d)| !damaged.iter().any(|x| &x.dir == d))
                        .collect();
                }
                continue;
            }
        }
        damaged.push(Damaged { dir, reason });
    }
    Ok(Resolved {
        checkpoint: None,
        damaged,
    })
}

/// Move a damaged checkpoint directory out of the way, to `checkpoints/damaged-step-NNNNNNNN`
/// (with `-2`, `-3`, ... if taken), so that a resumed run writing that step again does not
/// overwrite it and it stays for inspection. Returns the new path.
pub fn set_aside(dir: &Path) -> Result<PathBuf> {
    let parent = dir
        .parent()
        .ok_or_else(|| Error::checkpoint(dir, "a checkpoint directory has no parent"))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::checkpoint(dir, "not a checkpoint directory name"))?;
    for n in 1..=1000u32 {
        let target = if n == 1 {
            parent.join(format!("damaged-{name}"))
        } else {
            parent.join(format!("damaged-{name}-{n}"))
        };
        if target.exists() {
            continue;
        }
        fs::rename(dir, &target).map_err(|e| Error::io("cannot move a damaged checkpoint aside", dir, e))?;
        sync_dir(parent)?;
        return Ok(target);
    }
    Err(Error::checkpoint(
        dir,
        "too many damaged copies of this checkpoint are set aside",
    ))
}

/// Deletes all but the newest `keep` complete checkpoints of `run_dir` (`keep == 0` deletes them
/// all), and `step-*` directories that have no manifest at all (interrupted deletions).
///
/// Each checkpoint's manifest is removed (and that removal made durable) before the rest of the
/// directory, so that a crash in the middle of a deletion leaves an incomplete directory that
/// readers ignore, never a manifest describing files that are gone.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(());
    }
    let complete = list(run_dir)?;
    let doomed = complete.len().saturating_sub(keep);
    for (_, dir) in &complete[..doomed] {
        let manifest = dir.join(MANIFEST_FILE);
        fs::remove_file(&manifest).map_err(|e| Error::io("removing checkpoint manifest", &manifest, e))?;
        sync_dir(dir)?;
        fs::remove_dir_all(dir).map_err(|e| Error::io("removing checkpoint", dir, e))?;
    }
    for (name, path) in read_dir_entries(&root)? {
        // Only a directory known to lack its manifest: one that cannot be checked (a passing stat
        // error) may be the checkpoint just saved.
        if parse_step_dir_name(&name).is_some() && matches!(path.join(MANIFEST_FILE).try_exists(), Ok(false)) {
            fs::remove_dir_all(&path).map_err(|e| Error::io("removing incomplete checkpoint", &path, e))?;
        }
    }
    sync_dir(&root)
}

/// Reads and validates the manifest of the checkpoint directory `dir`.
/// What a checkpoint's manifest says about its parameter file, read without loading any tensor
/// (for readers that stream the parameters, such as ring-memory inference).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFileInfo {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Its training step.
    pub step: u64,
    /// `model.safetensors` in it.
    pub path: PathBuf,
    /// The file's length, as recorded.
    pub bytes: u64,
    /// Its SHA-256 (hex), as recorded.
    pub sha256: String,
    /// The manifest's `extra` value (the training configuration among others).
    pub extra: serde_json::Value,
}

/// Read the manifest of the checkpoint in `dir` and describe its parameter file. Nothing is
/// verified but the manifest itself: the caller checks the file's length and digest as it reads.
pub fn model_file_info(dir: &Path) -> Result<ModelFileInfo> {
    let manifest = read_manifest(dir)?;
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == MODEL_FILE)
        .ok_or_else(|| Error::checkpoint(dir, format!("the manifest lists no {MODEL_FILE}")))?;
    Ok(ModelFileInfo {
        dir: dir.to_path_buf(),
        step: manifest.step,
        path: dir.join(MODEL_FILE),
        bytes: entry.bytes,
        sha256: entry.sha256.clone(),
        extra: manifest.extra,
    })
}

/// The most a manifest may hold: one lists a few files (far below this); a larger one is not a
/// manifest semoe wrote.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Open a file of a checkpoint for reading, refusing a FIFO (its open would block for ever), a
/// device (a link to `/dev/zero` would be read without end) or a socket: a checkpoint holds
/// regular files. (A directory in a file's place fails its read, as an I/O error.)
pub fn open_checkpoint_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let kind = fs::metadata(path)?.file_type();
    if kind.is_fifo() || kind.is_char_device() || kind.is_block_device() || kind.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file (a checkpoint holds only regular files)",
        ));
    }
    File::open(path)
}

/// A manifest's bytes, at most [`MAX_MANIFEST_BYTES`].
fn read_manifest_bytes(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_checkpoint_file(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than any manifest ({} at most)", MAX_MANIFEST_BYTES),
        ));
    }
    Ok(bytes)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match read_manifest_bytes(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(Error::checkpoint(&path, format!("manifest is {e}")));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let detail = if dir.is_dir() {
                "not a complete checkpoint: manifest.json is missing (the save was interrupted, or this is not a \
                 checkpoint directory)"
            } else {
                "checkpoint directory does not exist"
            };
            return Err(Error::checkpoint(dir, detail));
        }
        Err(e) => return Err(read_error("reading checkpoint manifest", &path, e)),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::checkpoint(&path, format!("manifest is not valid JSON: {e}")))?;
    // The version is checked before the rest, so that a manifest from a newer semoe says so
    // instead of failing on whatever field changed.
    match value.get("format_version").and_then(serde_json::Value::as_u64) {
        Some(FORMAT_VERSION) => {}
        // Not damage: another semoe wrote it, and a resume must not set it aside (and drop the
        // log lines of its steps) as if it were.
        Some(v) => {
            return Err(Error::config(format!(
                "{}: unsupported manifest format_version {v} (this build reads version {FORMAT_VERSION}): the \
                 checkpoint was written by another version of semoe; use that version with it",
                path.display()
            )))
        }
        None => return Err(Error::checkpoint(&path, "manifest has no integer format_version")),
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| Error::checkpoint(&path, format!("manifest is malformed: {e}")))?;
    if let Some(recorded) = &manifest.manifest_sha256 {
        if *recorded != manifest.digest()? {
            return Err(Error::checkpoint(
                &path,
                "manifest does not match its own SHA-256 (manifest_sha256): it was changed or damaged after the save",
            ));
        }
    }

    let mut names = BTreeSet::new();
    for entry in &manifest.files {
        if entry.name != MODEL_FILE && entry.name != OPTIMIZER_FILE {
            return Err(Error::checkpoint(
                &path,
                format!("manifest lists unknown file {:?}", entry.name),
            ));
        }
        if !names.insert(entry.name.as_str()) {
            return Err(Error::checkpoint(&path, format!("manifest lists {} twice", entry.name)));
        }
    }
    if !names.contains(MODEL_FILE) {
        return Err(Error::checkpoint(&path, format!("manifest does not list {MODEL_FILE}")));
    }
    Ok(manifest)
}

/// Loads the checkpoint in directory `dir` (as returned by [`save`] or [`latest`]), verifying every
/// data file against the manifest before parsing it.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    load_parts(dir, true)
}

/// [`load`] without the optimizer state (generation, evaluation): its file, twice the model's
/// size, is neither read nor verified, and [`Checkpoint::optimizer`] is empty.
pub fn load_model_only(dir: &Path) -> Result<Checkpoint> {
    load_parts(dir, false)
}

fn load_parts(dir: &Path, with_optimizer: bool) -> Result<Checkpoint> {
    let manifest = read_manifest(dir)?;
    let mut model = BTreeMap::new();
    let mut optimizer = BTreeMap::new();
    for entry in manifest.files.iter().filter(|e| with_optimizer || e.name == MODEL_FILE) {
        let path = dir.join(&entry.name);
        let tensors = read_tensor_file(&path, entry)?;
        if entry.name == MODEL_FILE {
            model = tensors;
        } else {
            optimizer = tensors;
        }
    }
    Ok(Checkpoint {
        step: manifest.step,
        dir: dir.to_path_buf(),
        model,
        optimizer,
        extra: manifest.extra,
    })
}

/// Checks the safetensors file at `path` against its manifest `entry`, then maps it and copies out
/// its tensors, which must all be F32.
fn read_tensor_file(path: &Path, entry: &FileEntry) -> Result<BTreeMap<String, LoadedTensor>> {
    let mut file = open_checkpoint_file(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::checkpoint(path, "file listed in the manifest is missing"),
        io::ErrorKind::InvalidData => Error::checkpoint(path, e.to_string()),
        _ => read_error("opening checkpoint file", path, e),
    })?;
    // Length first (cheap, and names the usual failure, a torn write), then the digest, and only
    // then the parser: its error messages would be misleading on damaged input. The digest reads
    // the file with `read`, not through the mapping: a disk that cannot read a page then gives an
    // error naming the file (the checkpoint is damaged) instead of a SIGBUS that kills the process.
    verify_file(&mut file, path, entry.bytes, &entry.sha256)?;
    // SAFETY: the mapping is only read, and only while `file` is open. Another process truncating
    // or rewriting the file meanwhile could change or fault the mapped bytes; checkpoints are
    // written once under a temporary name and never modified in place, so only outside
    // interference could do that (the usual caveat of memory-mapped safetensors loading). The
    // pages were just read, so the parse finds them in the page cache.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping checkpoint file", path, e))?;
    let bytes: &[u8] = &map;
    if bytes.len() as u64 != entry.bytes {
        return Err(Error::checkpoint(path, "the file changed size while it was read"));
    }
    parse_tensors(path, bytes, &file)
}

/// Check that the checkpoint file `file` (at `path`) is `bytes` long and has the SHA-256 digest
/// `sha256` (hex), reading it in order; a mismatch or a read error of the medium is damage
/// ([`Error::Checkpoint`]), naming the file.
pub fn verify_file(file: &mut File, path: &Path, bytes: u64, sha256: &str) -> Result<()> {
    use std::io::Read;
    let len = file
        .metadata()
        .map_err(|e| read_error("reading checkpoint file metadata", path, e))?
        .len();
    if len != bytes {
        let what = if len < bytes { "truncated" } else { "wrong size" };
        return Err(Error::checkpoint(
            path,
            format!("{what}: {len} bytes on disk, the manifest says {bytes}"),
        ));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    // One byte past the size, at most: a file that grows (or a device that never ends) is caught
    // there rather than read for ever.
    let mut file = file.take(bytes.saturating_add(1));
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error("reading checkpoint file", path, e)),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != bytes {
        return Err(Error::checkpoint(
            path,
            format!("the file changed size while it was read ({read} of {bytes} bytes)"),
        ));
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if !digest.eq_ignore_ascii_case(sha256) {
        return Err(Error::checkpoint(
            path,
            format!("corrupt: SHA-256 mismatch (manifest {sha256}, file {digest})"),
        ));
    }
    Ok(())
}

/// An error reading a checkpoint file: a read error of the medium (`EIO`) is damage of that
/// checkpoint, like a digest mismatch, so that readers fall back to an older one and name it;
/// other errors (a permission refused, say) are I/O errors, which the caller must resolve.
fn read_error(context: &str, path: &Path, e: io::Error) -> Error {
    const EIO: i32 = 5;
    if e.raw_os_error() == Some(EIO) {
        Error::checkpoint(path, format!("unreadable ({context}): {e}"))
    } else {
        Error::io(context, path, e)
    }
}

/// Parses a verified safetensors image into owned f32 tensors.
/// The tensors of the safetensors image `bytes` (the mapped `file`): the header is parsed and
/// checked in the mapping, and each tensor's data read from `file` into its own buffer. Copying
/// out of the mapping would fault every page of it into the process, which then held the file
/// and the tensors at once (twice the checkpoint at its peak); read, the file stays in the page
/// cache, outside the process.
fn parse_tensors(path: &Path, bytes: &[u8], file: &File) -> Result<BTreeMap<String, LoadedTensor>> {
    // safetensors reads its JSON header into a map, so a repeated name would be silently merged;
    // look for one first to report it as what it is.
    if let Some(name) = duplicate_header_key(bytes) {
        return Err(Error::checkpoint(path, format!("duplicate tensor name {name:?}")));
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name} has dtype {:?}, expected F32", view.dtype()),
            ));
        }
        let shape = view.shape().to_vec();
        let raw = view.data();
        let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elements.and_then(|n| n.checked_mul(4)) != Some(raw.len()) {
            return Err(Error::checkpoint(
                path,
                format!("tensor {name} has shape {shape:?} but {} bytes of data", raw.len()),
            ));
        }
        // The view lies inside `bytes` (checked by the parser): its offset in the file.
        let offset = raw.as_ptr() as usize - bytes.as_ptr() as usize;
        let data = read_f32s(file, path, offset as u64, raw.len())?;
        out.insert(name.to_string(), LoadedTensor { shape, data });
    }
    Ok(out)
}

/// `len` bytes of `file` from `offset`, as little-endian f32s, read in pieces of at most 8 MiB
/// (one piece's bytes held at a time beside the values).
fn read_f32s(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<f32>> {
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 8 << 20;
    let mut out = Vec::with_capacity(len / 4);
    let mut buf = vec![0u8; len.min(PIECE)];
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(PIECE);
        file.read_exact_at(&mut buf[..n], offset + done as u64)
            .map_err(|e| read_error("reading checkpoint file", path, e))?;
        out.extend(
            buf[..n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        done += n;
    }
    Ok(out)
}

/// The first key that occurs twice in the JSON header of the safetensors image `bytes`, if any.
/// A header that cannot be read yields `None`: the safetensors parser then reports the problem.
fn duplicate_header_key(bytes: &[u8]) -> Option<String> {
    let len_bytes: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let header_len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
    let header = bytes.get(8..8usize.checked_add(header_len)?)?;
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(DuplicateKeyFinder).ok()?
}

/// A serde visitor that walks a JSON object's keys and returns the first repeated one.
struct DuplicateKeyFinder;

impl<'de> Visitor<'de> for DuplicateKeyFinder {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut duplicate = None;
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            if duplicate.is_none() && !seen.insert(key.clone()) {
                duplicate = Some(key);
            }
        }
        Ok(duplicate)
    }
}

/// The lowercase hex SHA-256 digest of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dir_names_round_trip_and_reject_leftovers() {
        assert_eq!(step_dir_name(42), "step-00000042");
        assert_eq!(step_dir_name(123_456_789), "step-123456789");
        assert_eq!(parse_step_dir_name("step-00000042"), Some(42));
        assert_eq!(parse_step_dir_name("step-123456789"), Some(123_456_789));
        for name in [
            ".step-00000042.tmp-17",
            ".step-00000042.old-17",
            "step-",
            "step-12a",
            "step-+12",
            "step-00000042.bak",
            "latest",
        ] {
            assert_eq!(parse_step_dir_name(name), None, "{name}");
        }
    }

    #[test]
    fn a_read_error_of_the_medium_is_damage_and_other_errors_are_not() {
        let path = Path::new("run/checkpoints/step-00000005/model.safetensors");
        let eio = read_error("reading checkpoint file", path, io::Error::from_raw_os_error(5));
        assert!(matches!(eio, Error::Checkpoint { .. }), "{eio}");
        assert!(eio.to_string().contains("unreadable"), "{eio}");
        let denied = read_error("reading checkpoint file", path, io::Error::from_raw_os_error(13));
        assert!(matches!(denied, Error::Io { .. }), "{denied}");
    }

    #[test]
    fn sha256_hex_matches_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn duplicate_header_keys_are_found() {
        let header = concat!(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
            r#""a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        );
        let mut image = (header.len() as u64).to_le_bytes().to_vec();
        image.extend_from_slice(header.as_bytes());
        image.extend_from_slice(&[0; 8]);
        assert_eq!(duplicate_header_key(&image), Some("a".to_string()));
        assert_eq!(duplicate_header_key(b"short"), None);
    }

    /// `eval` or `generate` reading a run that trains: the checkpoint it reads is pruned after a
    /// newer one is saved. The newer one is read; nothing is called damaged.
    #[test]
    fn a_checkpoint_pruned_while_read_is_not_damage() {
        let run = std::env::temp_dir().join(format!("semoe-ckpt-pruned-{}", std::process::id()));
        let _ = fs::remove_dir_all(&run);
        let data = [1.0f32, 2.0];
        let tensors = [NamedTensor::new("w", [2], &data)];
        let extra = serde_json::json!({});
        for step in [1, 2] {
            save(&run, step, &tensors, &tensors, &extra).expect("save");
        }
        let trained = std::cell::Cell::new(false);
        let resolved = newest_intact_by(&run, |dir| {
            if !trained.replace(true) {
                // The run saves step 3 and prunes step 2 (manifest first) while step 2 is read.
                save(&run, 3, &tensors, &tensors, &extra)?;
                fs::remove_file(dir.join(MANIFEST_FILE)).expect("prune's first removal");
            }
            load(dir)
        })
        .expect("resolve");
        let _ = fs::remove_dir_all(&run);
        assert!(resolved.damaged.is_empty(), "{:?}", resolved.damaged);
        assert_eq!(resolved.checkpoint.map(|c| c.step), Some(3));
    }

    #[test]
    fn save_rejects_bad_tensors_before_writing() {
        let data = [1.0f32, 2.0, 3.0];
        let cases: [&[NamedTensor]; 3] = [
            &[NamedTensor::new("w", [2, 2], &data)],
            &[NamedTensor::new("w", [3], &data), NamedTensor::new("w", [3], &data)],
            &[NamedTensor::new("__metadata__", [3], &data)],
        ];
        for tensors in cases {
            assert!(matches!(check_tensors(MODEL_FILE, tensors), Err(Error::Shape { .. })));
        }
        assert!(check_tensors(MODEL_FILE, &[NamedTensor::new("w", [3], &data)]).is_ok());
        assert!(check_tensors(MODEL_FILE, &[NamedTensor::new("e", [0, 5], &[])]).is_ok());
    }
}
