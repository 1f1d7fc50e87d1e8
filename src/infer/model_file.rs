//! A checkpoint's parameter file read piece by piece with positional reads, never whole: what
//! ring-memory inference streams its weights from.
//!
//! [`ModelFile::open`] checks the file against its manifest (length, then SHA-256 over a stream of
//! fixed-size reads, so that a model larger than memory is verified without being held), parses
//! the safetensors header, and checks that every tensor the model needs is there, F32, with its
//! shape. Reads ([`ModelFile::read_piece`]) go through `pread` into the caller's buffer: the page
//! cache may hold the file, the process does not. A ring may instead map the file
//! ([`super::mapped::MappedModel`]) and keep only the pages of the pieces it holds mapped, which
//! keeps the resident set within its budget without copying.

use super::weights::{piece_layout, Piece};
use crate::error::{Error, Result};
use crate::model::gpt::GptConfig;
use crate::storage::checkpoint::{self, ModelFileInfo};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where one tensor's data lies in the file.
#[derive(Clone, Debug)]
struct TensorEntry {
    /// Absolute byte offset of its first element.
    offset: u64,
    /// Its elements.
    len: usize,
    /// Its shape (the model's layout: a transposed tensor has the same elements).
    shape: Vec<usize>,
}

/// A verified checkpoint parameter file, open for positional reads.
pub struct ModelFile {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    config: GptConfig,
    step: u64,
    bytes: u64,
    tensors: HashMap<String, TensorEntry>,
}

/// The largest safetensors header read (a model's header is a few KiB per tensor).
const MAX_HEADER: u64 = 64 << 20;

impl ModelFile {
    /// Open the checkpoint `path` (a checkpoint directory, or a run directory: its newest
    /// checkpoint that verifies, with a warning on standard error for each newer damaged one).
    pub fn open(path: &Path) -> Result<Self> {
        if path.join(checkpoint::MANIFEST_FILE).exists() {
            return Self::open_checkpoint(path);
        }
        // Every step directory, also those whose manifest fails (`list` leaves them out), so that
        // each newer damaged one is named before an older one is used.
        let mut candidates = checkpoint::step_dirs(path)?;
        if candidates.is_empty() {
            return Err(Error::config(format!(
                "{} is neither a checkpoint nor a run directory with one",
                path.display()
            )));
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut last = None;
        for (_, dir) in candidates {
            match Self::open_checkpoint(&dir) {
                Ok(file) => return Ok(file),
                Err(e) => {
                    crate::say!(
                        "warning: checkpoint {} is damaged ({e}); trying an older one",
                        dir.display()
                    );
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::config("no intact checkpoint")))
    }

    fn open_checkpoint(dir: &Path) -> Result<Self> {
        let info = checkpoint::model_file_info(dir)?;
        let config = crate::storage::state::model_config(&info.dir, &info.extra)?;
        let mut file = checkpoint::open_checkpoint_file(&info.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::checkpoint(&info.path, e.to_string()),
            _ => Error::io("opening checkpoint file", &info.path, e),
        })?;
        verify(&mut file, &info)?;
        let tensors = parse_header(&file, &info)?;
        let model = ModelFile {
            dir: info.dir.clone(),
            path: info.path.clone(),
            file,
            config,
            step: info.step,
            bytes: info.bytes,
            tensors,
        };
        model.check_tensors()?;
        Ok(model)
    }

    /// Every tensor of the model present with its shape (computed from the config: building the
    /// model to ask it would need the memory this reader exists to avoid), and no other: a file
    /// with more layers than its manifest says would otherwise serve a truncated model, which the
    /// resident loader refuses.
    fn check_tensors(&self) -> Result<()> {
        let mut expected = std::collections::HashSet::new();
        for (name, shape, len) in self.config.checked_tensor_shapes(self.tensors.len())? {
            match self.tensors.get(&name) {
                None => {
                    return Err(Error::checkpoint(&self.path, format!("tensor {name} is missing")));
                }
                Some(t) if t.len != len => {
                    return Err(Error::checkpoint(
                        &self.path,
                        format!("tensor {name} has {} elements, the model needs {len}", t.len),
                    ));
                }
                Some(t) if t.shape != shape => {
                    return Err(Error::checkpoint(
                        &self.path,
                        format!("tensor {name} has shape {:?}, the model needs {shape:?}", t.shape),
                    ));
                }
                Some(_) => {}
            }
            expected.insert(name);
        }
        if let Some(extra) = self.tensors.keys().filter(|n| !expected.contains(*n)).min() {
            return Err(Error::checkpoint(
                &self.path,
                format!("it holds tensor {extra:?}, which this model does not have"),
            ));
        }
        Ok(())
    }

    /// The model's configuration, as the checkpoint records it.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The checkpoint's training step.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The file's length in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read elements `start..start + dst.len()` of tensor `name` into `dst`.
    pub fn read(&self, name: &str, start: usize, dst: &mut [f32]) -> Result<()> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor {name} is missing")))?;
        if start.checked_add(dst.len()).is_none_or(|end| end > t.len) {
            return Err(Error::checkpoint(
                &self.path,
                format!("read past the end of {name} ({} + {} > {})", start, dst.len(), t.len),
            ));
        }
        self.read_at(t.offset + 4 * start as u64, dst, name)
    }

    /// Read the little-endian floats at byte `offset` of the file into `dst` (`what` names them in
    /// an error).
    pub(super) fn read_at(&self, offset: u64, dst: &mut [f32], what: &str) -> Result<()> {
        self.file
            .read_exact_at(bytemuck::cast_slice_mut(dst), offset)
            .map_err(|e| Error::io(format!("reading {what}"), &self.path, e))?;
        crate::kernels::bytes::floats_from_le_in_place(dst);
        Ok(())
    }

    /// A whole tensor.
    pub fn tensor(&self, name: &str) -> Result<Vec<f32>> {
        let len = self.tensors.get(name).map(|t| t.len).unwrap_or(0);
        let mut out = vec![0.0f32; len];
        self.read(name, 0, &mut out)?;
        Ok(out)
    }

    /// Where each part of `piece` lies in the file, in [`piece_layout`] order: (byte offset,
    /// elements). Parts of no elements (a dense block's absent gate) are included, with length 0.
    pub fn piece_parts(&self, piece: Piece) -> Result<Vec<(u64, usize)>> {
        let layout = piece_layout(&self.config, piece);
        let mut out = Vec::with_capacity(layout.len());
        for ((name, start), len) in piece_sources(&self.config, piece).into_iter().zip(layout) {
            if len == 0 {
                out.push((0, 0));
                continue;
            }
            let t = self
                .tensors
                .get(&name)
                .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor {name} is missing")))?;
            if start.checked_add(len).is_none_or(|end| end > t.len) {
                return Err(Error::checkpoint(
                    &self.path,
                    format!("{piece:?} reads past the end of {name} ({start} + {len} > {})", t.len),
                ));
            }
            out.push((t.offset + 4 * start as u64, len));
        }
        Ok(out)
    }

    /// Whether the open file's length is no longer the verified one (truncated or rewritten behind
    /// the reader's back): a mapped reader checks this before reading pages in place, since a read
    /// past the end of a mapped file is a fault, not an error.
    pub fn changed_size(&self) -> Result<bool> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io("reading checkpoint file metadata", &self.path, e))?
            .len();
        Ok(len != self.bytes)
    }

    /// The open file (for mapping it: `infer::mapped`).
    pub(super) fn handle(&self) -> &File {
        &self.file
    }

    /// Read `piece` into `dst` (laid out by [`piece_layout`]); returns the bytes read.
    pub fn read_piece(&self, piece: Piece, dst: &mut [f32]) -> Result<u64> {
        let layout = piece_layout(&self.config, piece);
        let total: usize = layout.iter().sum();
        if dst.len() < total {
            return Err(Error::shape(
                format!("buffer for {piece:?}"),
                format!("{} < {total}", dst.len()),
            ));
        }
        let mut at = 0;
        for ((name, start), len) in piece_sources(&self.config, piece).into_iter().zip(layout) {
            if len > 0 {
                self.read(&name, start, &mut dst[at..at + len])?;
            }
            at += len;
        }
        Ok(4 * total as u64)
    }
}

/// The tensor and first element of each part of `piece`, in [`piece_layout`] order.
fn piece_sources(config: &GptConfig, piece: Piece) -> Vec<(String, usize)> {
    let (d, f) = (config.d_model, config.d_ff);
    match piece {
        Piece::Attention(l) => {
            let n = |s: &str| (format!("h.{l}.{s}"), 0);
            vec![
                n("ln1.weight"),
                n("ln1.bias"),
                n("attn.wqkv"),
                n("attn.bqkv"),
                n("attn.wo"),
                n("attn.bo"),
                n("ln2.weight"),
                n("ln2.bias"),
                n("moe.wg"),
            ]
        }
        Piece::Dense(l) => ["mlp.w1", "mlp.b1", "mlp.w2", "mlp.b2"]
            .iter()
            .map(|s| (format!("h.{l}.{s}"), 0))
            .collect(),
        Piece::Expert(l, e) => vec![
            (format!("h.{l}.moe.w1"), e * d * f),
            (format!("h.{l}.moe.b1"), e * f),
            (format!("h.{l}.moe.w2"), e * f * d),
            (format!("h.{l}.moe.b2"), e * d),
        ],
        Piece::Head => vec![
            ("ln_f.weight".into(), 0),
            ("ln_f.bias".into(), 0),
            ("lm_head".into(), 0),
        ],
    }
}

/// Length, then SHA-256 over the whole file in fixed-size reads.
fn verify(file: &mut File, info: &ModelFileInfo) -> Result<()> {
    checkpoint::verify_file(file, &info.path, info.bytes, &info.sha256)
}

/// The safetensors header: every tensor's place in the file (F32 only, inside the file).
fn parse_header(file: &File, info: &ModelFileInfo) -> Result<HashMap<String, TensorEntry>> {
    let bad = |detail: String| Error::checkpoint(&info.path, format!("not a valid safetensors file: {detail}"));
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|e| Error::io("reading the safetensors header", &info.path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || 8 + header_len > info.bytes {
        return Err(bad(format!("header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| Error::io("reading the safetensors header", &info.path, e))?;
    let parsed: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = HashMap::new();
    for (name, v) in parsed {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        if dtype != "F32" {
            return Err(Error::checkpoint(
                &info.path,
                format!("tensor {name} has dtype {dtype:?}, expected F32"),
            ));
        }
        let offsets = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| {
                s.iter()
                    .map(|d| usize::try_from(d.as_u64()?).ok())
                    .collect::<Option<_>>()
            })
            .ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
        let elements = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
        let (begin, end) = offsets;
        let inside = data_start.checked_add(end).is_some_and(|last| last <= info.bytes);
        if end < begin || end - begin != elements.saturating_mul(4) || !inside {
            return Err(bad(format!(
                "tensor {name}: data {begin}..{end} for {elements} elements in a file of {} bytes",
                info.bytes
            )));
        }
        out.insert(
            name,
            TensorEntry {
                offset: data_start + begin,
                len: elements as usize,
                shape,
            },
        );
    }
    Ok(out)
}
