//! The metrics log (`metrics.jsonl`): its record types, the writer the trainer appends with and the
//! reader the report, `semoe runs` and a resume parse it with. One schema for both sides, so that
//! they cannot drift.
//!
//! One JSON object per line, its kind in `"kind"`:
//!
//! - `train` ([`TrainRecord`]): `{"kind":"train","step":120,"tokens":245760.0,"elapsed_s":31.2,"loss":2.13,
//!   "ce_loss":2.11,"aux_loss":0.021,"lr":0.003,"grad_norm":0.8,"tokens_per_s":7900.0,"expert_tokens":[[..]],
//!   "dropped":[..]}`, one per optimizer step;
//! - `val` ([`ValRecord`]): `{"kind":"val","step":200,"elapsed_s":55.0,"val_loss":1.95}`;
//! - `storage` ([`StorageRecord`]): the expert tiers' figures summed over workers, with each `val`;
//! - `dense` ([`DenseRecord`]): sharded dense parameters' figures per worker, with each `val`;
//! - `checkpoint` ([`CheckpointRecord`]): `{"kind":"checkpoint","step":200,"path":"..."}`;
//! - `membership` ([`MembershipRecord`]): each epoch of a run over worker processes, with the state
//!   it was sent;
//! - `traffic` ([`TrafficRecord`]): at the end of a run over the actor runtime, the payload bytes
//!   each worker sent each other, by kind.
//!
//! The writer serializes through a [`serde_json::Value`], so that a line's keys are sorted as they
//! always were; `tokens` is written as a float (`245760.0`) and NaN losses as `null`. The reader
//! accepts an integral float wherever a step or count is expected, reads a `null` loss as NaN,
//! ignores fields it does not know, yields records of other kinds as [`Parsed::Unknown`] and a line
//! that is not a well-formed record as [`Parsed::Malformed`], with its line number (a run killed
//! mid-write leaves a partial last line).

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The metrics log in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One training record: one optimizer step.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TrainRecord {
    /// The optimizer step.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// Training tokens seen so far (cumulative; written as a float, as the log always had it).
    #[serde(deserialize_with = "count", serialize_with = "as_float")]
    pub tokens: u64,
    /// Seconds since the start of the run.
    pub elapsed_s: f64,
    /// The loss minimised: the cross-entropy plus the routers' auxiliary loss; NaN when the log
    /// holds `null`. In nats per byte: [`TrainRecord::nats_per_byte`].
    #[serde(deserialize_with = "nullable_f64")]
    pub loss: f64,
    /// The cross-entropy part of the loss.
    #[serde(default, deserialize_with = "optional_f64", skip_serializing_if = "Option::is_none")]
    pub ce_loss: Option<f64>,
    /// The auxiliary (load balancing) part of the loss.
    #[serde(default, deserialize_with = "optional_f64", skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// The learning rate.
    #[serde(default, deserialize_with = "optional_f64", skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The gradient norm before clipping.
    #[serde(default, deserialize_with = "optional_f64", skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Training throughput, NaN when the log holds `null`.
    #[serde(deserialize_with = "nullable_f64")]
    pub tokens_per_s: f64,
    /// Kept assignments per MoE layer (outer) per expert (inner) in this step.
    #[serde(default)]
    pub expert_tokens: Vec<Vec<u64>>,
    /// Dropped assignments per MoE layer in this step.
    #[serde(default)]
    pub dropped: Vec<u64>,
}

impl TrainRecord {
    /// The training loss in nats per byte: the cross-entropy, comparable with the validation loss
    /// (`loss` also holds the routers' auxiliary loss; logs written before `ce_loss` have only it).
    pub fn nats_per_byte(&self) -> f64 {
        self.ce_loss.unwrap_or(self.loss)
    }
}

/// One validation record.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ValRecord {
    /// The optimizer step the model was evaluated at.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// Seconds since the start of the run, if logged.
    #[serde(default, deserialize_with = "optional_f64", skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// The validation loss (nats/byte), NaN when the log holds `null`.
    #[serde(deserialize_with = "nullable_f64")]
    pub val_loss: f64,
}

/// The expert tiers' figures at one step (a `storage` record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageRecord {
    /// The step.
    pub step: u64,
    /// The figures, summed over workers (boxed: they are by far the largest record, and every
    /// parsed line would otherwise be their size).
    pub stats: Box<crate::storage::tiers::TierStats>,
}

/// Sharded dense parameters' figures at one step (a `dense` record), one entry per worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseRecord {
    /// The step.
    pub step: u64,
    /// Each worker's figures.
    pub workers: Vec<crate::actors::gather::DenseStats>,
}

/// A membership epoch formed (a run over worker processes): who trains from `step` on, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MembershipRecord {
    /// Steps committed when the epoch formed.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// The epoch (1: the first set of workers).
    pub epoch: u64,
    /// Worker processes in it.
    pub workers: usize,
    /// Why it formed (`start`, `member 3 joins`, `member 2 lost: ...`).
    pub why: String,
    /// Whether kept workers kept their state and only what changed owner was sent (a join or
    /// leave), rather than every worker's whole share (the first epoch, a loss).
    #[serde(default)]
    pub handed_over: bool,
    /// Expert units (one expert of one MoE block, with its moments) sent to workers.
    #[serde(default)]
    pub expert_units_sent: u64,
    /// Dense tensors sent to workers.
    #[serde(default)]
    pub dense_tensors_sent: u64,
    /// Bytes of state sent to workers.
    #[serde(default)]
    pub state_bytes_sent: u64,
}

/// The bytes the workers sent each other over the run, by kind (written at the end of a run over
/// the actor runtime): workers by index in one process, by member id over worker processes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrafficRecord {
    /// Steps committed.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// Steps committed when the invocation that counted these bytes started (its counters start
    /// at zero: a resumed run's record covers the steps since it resumed; 0 in logs written before
    /// the field).
    #[serde(default, deserialize_with = "count")]
    pub since: u64,
    /// Whether `from` and `to` are member ids (a run over worker processes), not worker indices.
    pub members: bool,
    /// The non-zero cells.
    pub entries: Vec<crate::actors::traffic::TrafficEntry>,
}

/// A checkpoint written at one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// The step.
    #[serde(deserialize_with = "count")]
    pub step: u64,
    /// The checkpoint's directory.
    pub path: PathBuf,
}

/// One record of the metrics log, tagged by its `"kind"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// `"kind":"train"`.
    Train(TrainRecord),
    /// `"kind":"val"`.
    Val(ValRecord),
    /// `"kind":"storage"`.
    Storage(StorageRecord),
    /// `"kind":"dense"`.
    Dense(DenseRecord),
    /// `"kind":"checkpoint"`.
    Checkpoint(CheckpointRecord),
    /// `"kind":"membership"`.
    Membership(MembershipRecord),
    /// `"kind":"traffic"`.
    Traffic(TrafficRecord),
}

impl Record {
    /// The kinds this schema knows.
    pub const KINDS: [&'static str; 7] = [
        "train",
        "val",
        "storage",
        "dense",
        "checkpoint",
        "membership",
        "traffic",
    ];

    /// The record's step.
    pub fn step(&self) -> u64 {
        match self {
            Record::Train(r) => r.step,
            Record::Val(r) => r.step,
            Record::Storage(r) => r.step,
            Record::Dense(r) => r.step,
            Record::Checkpoint(r) => r.step,
            Record::Membership(r) => r.step,
            Record::Traffic(r) => r.step,
        }
    }

    /// The record as one line of the log (without the newline).
    pub fn to_line(&self) -> Result<String> {
        // Through a `Value`, whose keys are sorted: the lines stay as they were written before the
        // schema was typed.
        serde_json::to_value(self)
            .map(|v| v.to_string())
            .map_err(|e| Error::parse("metrics record", e.to_string()))
    }
}

/// Reads a non-negative integer, also written as an integral float (`2048.0`).
fn count<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let v = serde_json::Number::deserialize(d)?;
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    match v.as_f64() {
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => Ok(x as u64),
        _ => Err(serde::de::Error::custom(format!(
            "expected a non-negative integer, found {v}"
        ))),
    }
}

/// Writes a count as a float (`245760.0`).
fn as_float<S: Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(*v as f64)
}

/// Reads `null` as NaN.
fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads an optional float (`null` or absent: `None`).
fn optional_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

/// Appends records to a metrics log, one line each.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `path` for appending (creating it if needed).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| Error::io("cannot open the metrics log", path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record.
    pub fn write(&mut self, record: &Record) -> Result<()> {
        let line = record.to_line()?;
        writeln!(self.file, "{line}").map_err(|e| Error::io("cannot append to the metrics log", &self.path, e))
    }

    /// Makes the lines appended so far durable. Called before each checkpoint: a power loss must
    /// not leave a durable checkpoint of step N with a log that ends before it (a resume from N
    /// would never write the missing steps' lines again).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("cannot make the metrics log durable", &self.path, e))
    }
}

/// A line that is not a well-formed record: not a JSON object with a string `kind`, or a record of
/// a known kind that does not fit its schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    /// The line number (1-based).
    pub line: usize,
    /// The record's kind, if the line names one.
    pub kind: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(kind) => write!(f, "line {}: malformed `{kind}` record: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// What one line of the log holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    /// Nothing but whitespace.
    Blank,
    /// A record of a known kind.
    Record(Record),
    /// A record of another kind (`config`, ...), with its kind.
    Unknown(String),
    /// Not a well-formed record.
    Malformed(Malformed),
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The line number (1-based).
    pub line: usize,
    /// The line's bytes, without its line ending.
    pub text: Vec<u8>,
    /// The line's `"step"` if it is a JSON object with a non-negative integer there, written as
    /// one or as a float without a fraction (whatever its kind).
    pub step: Option<u64>,
    /// What the line holds.
    pub parsed: Parsed,
}

/// Parses line `line` (1-based, for messages) of a log.
pub fn parse_line(line: usize, text: &[u8]) -> Entry {
    let entry = |step, parsed| Entry {
        line,
        text: text.to_vec(),
        step,
        parsed,
    };
    if text.iter().all(u8::is_ascii_whitespace) {
        return entry(None, Parsed::Blank);
    }
    let malformed = |kind: Option<&str>, message: String| {
        Parsed::Malformed(Malformed {
            line,
            kind: kind.map(str::to_string),
            message,
        })
    };
    let value: serde_json::Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return entry(None, malformed(None, format!("not JSON: {e}"))),
    };
    // As the records read it ([`count`]: older logs wrote `6.0`), so that a resume drops such a
    // line after its checkpoint too.
    let step = value.get("step").and_then(|v| count(v).ok());
    let Some(kind) = value.as_object().and_then(|o| o.get("kind")).and_then(|k| k.as_str()) else {
        return entry(
            step,
            malformed(None, "not a JSON object with a string `kind`".to_string()),
        );
    };
    let kind = kind.to_string();
    let parsed = match kind.as_str() {
        "train" => serde_json::from_value(value).map(Record::Train),
        "val" => serde_json::from_value(value).map(Record::Val),
        "storage" => serde_json::from_value(value).map(Record::Storage),
        "dense" => serde_json::from_value(value).map(Record::Dense),
        "checkpoint" => serde_json::from_value(value).map(Record::Checkpoint),
        "membership" => serde_json::from_value(value).map(Record::Membership),
        "traffic" => serde_json::from_value(value).map(Record::Traffic),
        _ => return entry(step, Parsed::Unknown(kind)),
    };
    match parsed {
        Ok(record) => entry(step, Parsed::Record(record)),
        Err(e) => entry(step, malformed(Some(&kind), e.to_string())),
    }
}

/// Reads a metrics log line by line; yields an error only if the file cannot be read.
pub struct LogReader<R> {
    reader: R,
    path: PathBuf,
    line: usize,
    buf: Vec<u8>,
}

impl LogReader<BufReader<File>> {
    /// Opens a log (a missing file is an error of kind `NotFound`, see [`Error::io`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening the metrics log", path, e))?;
        Ok(Self::new(BufReader::new(file), path))
    }
}

impl<R: BufRead> LogReader<R> {
    /// Reads a log from `reader`; `path` names it in errors.
    pub fn new(reader: R, path: &Path) -> Self {
        Self {
            reader,
            path: path.to_path_buf(),
            line: 0,
            buf: Vec::new(),
        }
    }

    /// The number of lines read so far.
    pub fn lines_read(&self) -> usize {
        self.line
    }
}

impl<R: BufRead> Iterator for LogReader<R> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        self.buf.clear();
        match self.reader.read_until(b'\n', &mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                let mut text = self.buf.as_slice();
                if let Some(t) = text.strip_suffix(b"\n") {
                    text = t.strip_suffix(b"\r").unwrap_or(t);
                }
                Some(Ok(parse_line(self.line, text)))
            }
            Err(e) => Some(Err(Error::io("reading the metrics log", &self.path, e))),
        }
    }
}

/// How much of a log [`TailReader`] reads at a time, from the end backwards (at least; a line
/// longer than that doubles it). Tiny in unit tests, so that lines cross chunks.
const TAIL_CHUNK: usize = if cfg!(test) { 7 } else { 64 << 10 };

/// The longest line [`TailReader`] parses (16 MiB): a longer one is yielded as
/// [`Parsed::Malformed`] without being held whole (a damaged log cannot make a summary hold it in
/// memory).
const TAIL_MAX_LINE: usize = if cfg!(test) { 400 } else { 16 << 20 };

/// Reads a metrics log's lines from the last to the first, a chunk at a time: what is wanted of
/// a long run's log is near its end (`semoe runs` shows the last figures), and a forward reader
/// would parse every line of it. The lines are [`LogReader`]'s, in reverse; entries carry line
/// number 0 (unknown when reading backwards). An I/O error ends the iteration with that error.
pub struct TailReader {
    file: File,
    path: PathBuf,
    /// The file's length when opened.
    len: u64,
    /// The file offset where the bytes not yet read end.
    pos: u64,
    /// Bytes read but not yet yielded, without the line break that ended the last of them.
    pending: Vec<u8>,
    /// Whether the line being assembled has grown past `TAIL_MAX_LINE` (its bytes are dropped).
    overlong: bool,
    done: bool,
}

impl TailReader {
    /// Opens a log (a missing file is an error of kind `NotFound`, see [`Error::io`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening the metrics log", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("reading the metrics log's size", path, e))?
            .len();
        Ok(TailReader {
            file,
            path: path.to_path_buf(),
            len,
            pos: len,
            pending: Vec::new(),
            overlong: false,
            done: len == 0,
        })
    }

    /// Bytes read from the file so far.
    pub fn bytes_read(&self) -> u64 {
        self.len - self.pos
    }

    /// Read the chunk before `pos` in front of `pending`.
    fn read_chunk(&mut self) -> std::io::Result<()> {
        let first = self.pos == self.len;
        let n = self.pos.min(TAIL_CHUNK.max(self.pending.len()) as u64) as usize;
        let mut chunk = vec![0u8; n];
        self.file.seek(SeekFrom::Start(self.pos - n as u64))?;
        self.file.read_exact(&mut chunk)?;
        self.pos -= n as u64;
        // The file's last line break ends its last line; it does not start an empty one.
        if first && chunk.last() == Some(&b'\n') {
            chunk.pop();
        }
        chunk.extend_from_slice(&self.pending);
        self.pending = chunk;
        Ok(())
    }

    fn entry(&mut self, mut text: &[u8]) -> Entry {
        if std::mem::take(&mut self.overlong) || text.len() > TAIL_MAX_LINE {
            return Entry {
                line: 0,
                text: Vec::new(),
                step: None,
                parsed: Parsed::Malformed(Malformed {
                    line: 0,
                    kind: None,
                    message: format!("a line over {TAIL_MAX_LINE} bytes"),
                }),
            };
        }
        if let Some(t) = text.strip_suffix(b"\r") {
            text = t;
        }
        parse_line(0, text)
    }
}

impl Iterator for TailReader {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            if self.done {
                return None;
            }
            if self.pos < self.len {
                if let Some(at) = self.pending.iter().rposition(|&b| b == b'\n') {
                    let line = self.pending.split_off(at + 1);
                    self.pending.pop();
                    return Some(Ok(self.entry(&line)));
                }
                if self.pos == 0 {
                    // The file's first line.
                    self.done = true;
                    let line = std::mem::take(&mut self.pending);
                    return Some(Ok(self.entry(&line)));
                }
                if self.pending.len() > TAIL_MAX_LINE {
                    // All of it is the line being assembled: keep none of an overlong line.
                    self.overlong = true;
                    self.pending = Vec::new();
                }
            }
            if let Err(e) = self.read_chunk() {
                self.done = true;
                return Some(Err(Error::io("reading the metrics log", &self.path, e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> TrainRecord {
        TrainRecord {
            step: 3,
            tokens: 768,
            elapsed_s: 1.5,
            loss: 2.25,
            ce_loss: Some(2.0),
            aux_loss: Some(0.25),
            lr: Some(0.001),
            grad_norm: Some(0.5),
            tokens_per_s: 512.0,
            expert_tokens: vec![vec![1, 2], vec![3, 0]],
            dropped: vec![0, 1],
        }
    }

    /// The lines [`TailReader`] yields, as `(text, parsed kind)`, first line first.
    fn tail_lines(bytes: &[u8]) -> Vec<(Vec<u8>, Option<String>)> {
        let dir = std::env::temp_dir().join(format!("semoe-tail-{}-{}", std::process::id(), bytes.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        std::fs::write(&path, bytes).unwrap();
        let mut reader = TailReader::open(&path).unwrap();
        let mut out: Vec<_> = reader
            .by_ref()
            .map(|e| {
                let e = e.unwrap();
                let kind = match e.parsed {
                    Parsed::Malformed(m) => Some(m.message),
                    _ => None,
                };
                (e.text, kind)
            })
            .collect();
        assert_eq!(reader.bytes_read(), bytes.len() as u64, "read whole once");
        std::fs::remove_dir_all(&dir).unwrap();
        out.reverse();
        out
    }

    #[test]
    fn the_tail_reader_yields_the_forward_readers_lines_in_reverse() {
        let record = Record::Train(train()).to_line().unwrap();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\n".to_vec(),
            b"a".to_vec(),
            b"a\n".to_vec(),
            b"\nb".to_vec(),
            b"a\n\n".to_vec(),
            b"ab\r\ncd\r\n\n\nefghijklmnopq\nr".to_vec(),
            format!("{record}\n{record}\n{{\"kind\":\"tr").into_bytes(),
        ];
        for bytes in cases {
            let forward: Vec<(Vec<u8>, Option<String>)> = LogReader::new(&bytes[..], Path::new("log"))
                .map(|e| (e.unwrap().text, None))
                .collect();
            let backward: Vec<_> = tail_lines(&bytes).into_iter().map(|(t, _)| (t, None)).collect();
            assert_eq!(backward, forward, "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn the_tail_reader_drops_an_overlong_line_without_holding_it() {
        let long = "x".repeat(TAIL_MAX_LINE + 30);
        let bytes = format!("first\n{long}\nlast\n{long}");
        let lines = tail_lines(bytes.as_bytes());
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].0, b"first");
        assert_eq!(lines[2].0, b"last");
        for i in [1, 3] {
            assert!(lines[i].0.is_empty());
            assert_eq!(lines[i].1.as_deref(), Some("a line over 400 bytes"));
        }
    }

    #[test]
    fn lines_are_written_as_the_json_literals_were() {
        let line = Record::Train(train()).to_line().unwrap();
        let old = serde_json::json!({"kind": "train", "step": 3u64, "tokens": 3.0 * 256.0,
            "elapsed_s": 1.5, "loss": 2.25, "ce_loss": 2.0, "aux_loss": 0.25, "lr": 0.001,
            "grad_norm": 0.5, "tokens_per_s": 512.0, "expert_tokens": vec![vec![1usize, 2], vec![3, 0]],
            "dropped": vec![0usize, 1]});
        assert_eq!(line, old.to_string());
        let val = Record::Val(ValRecord {
            step: 4,
            elapsed_s: Some(2.0),
            val_loss: f64::NAN,
        });
        let old = serde_json::json!({"kind": "val", "step": 4u64, "elapsed_s": 2.0, "val_loss": f64::NAN});
        assert_eq!(val.to_line().unwrap(), old.to_string());
        let ckpt = Record::Checkpoint(CheckpointRecord {
            step: 4,
            path: PathBuf::from("r/checkpoints/step-4"),
        });
        let old =
            serde_json::json!({"kind": "checkpoint", "step": 4u64, "path": PathBuf::from("r/checkpoints/step-4")});
        assert_eq!(ckpt.to_line().unwrap(), old.to_string());
    }

    #[test]
    fn records_round_trip() {
        let rec = Record::Train(train());
        let entry = parse_line(1, rec.to_line().unwrap().as_bytes());
        assert_eq!(entry.parsed, Parsed::Record(rec));
        assert_eq!(entry.step, Some(3));
    }

    #[test]
    fn unknown_kinds_blank_and_malformed_lines() {
        let text = b"{\"kind\":\"config\",\"step\":2}\n\n{\"kind\":\"val\",\"step\":5}\r\ngarbage\n{\"kind\":\"val\",\"step\":6.0,\"val_loss\":null}";
        let entries: Vec<Entry> = LogReader::new(&text[..], Path::new("m.jsonl"))
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].parsed, Parsed::Unknown("config".to_string()));
        assert_eq!(entries[0].step, Some(2));
        assert_eq!(entries[1].parsed, Parsed::Blank);
        assert_eq!(entries[2].text, b"{\"kind\":\"val\",\"step\":5}");
        let Parsed::Malformed(m) = &entries[2].parsed else {
            panic!("{:?}", entries[2].parsed)
        };
        assert_eq!((m.line, m.kind.as_deref()), (3, Some("val")));
        assert!(
            m.to_string()
                .starts_with("line 3: malformed `val` record: missing field `val_loss`"),
            "{m}"
        );
        let Parsed::Malformed(m) = &entries[3].parsed else {
            panic!("{:?}", entries[3].parsed)
        };
        assert_eq!((m.line, m.kind.as_deref()), (4, None));
        let Parsed::Record(Record::Val(v)) = &entries[4].parsed else {
            panic!("{:?}", entries[4].parsed)
        };
        assert_eq!(v.step, 6);
        assert!(v.val_loss.is_nan());
        assert_eq!(entries[4].step, Some(6), "as its record reads it");
    }
}
