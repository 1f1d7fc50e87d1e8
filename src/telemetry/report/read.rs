//! Reading the metrics log into [`Metrics`]: the records the report uses, with those a resumed run
//! superseded removed (see the [report's documentation](super)).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::log::{LogReader, Parsed, Record};

use super::{DenseRecord, StorageRecord, TrainRecord, ValRecord};

/// The parsed metrics log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Training records in step order (superseded records of a resumed run removed).
    pub train: Vec<TrainRecord>,
    /// Validation records in step order (superseded records of a resumed run removed).
    pub val: Vec<ValRecord>,
    /// Line numbers (1-based) of the lines that could not be parsed.
    pub malformed_lines: Vec<usize>,
    /// Records of kinds other than `train`, `val`, `storage` and `dense`.
    pub other_records: usize,
    /// The last `storage` record (the expert tiers' figures, summed over workers), if any.
    pub storage: Option<StorageRecord>,
    /// The last `dense` record (sharded dense parameters, per worker), if any.
    pub dense: Option<DenseRecord>,
    /// Records dropped because a resumed run logged their steps again.
    pub superseded_records: usize,
    /// Membership epochs of a run over worker processes, in the order they formed.
    pub membership: Vec<crate::train::log::MembershipRecord>,
    /// The last `traffic` record (bytes between workers over the run), if any.
    pub traffic: Option<crate::train::log::TrafficRecord>,
}

impl Metrics {
    fn push_train(&mut self, rec: TrainRecord) {
        if self.train.last().is_some_and(|last| rec.step <= last.step) {
            self.supersede_train(rec.step);
            self.supersede_val(rec.step);
        }
        self.train.push(rec);
    }

    fn push_val(&mut self, rec: ValRecord) {
        if self.val.last().is_some_and(|last| rec.step <= last.step) {
            self.supersede_val(rec.step);
        }
        self.val.push(rec);
    }

    fn supersede_train(&mut self, step: u64) {
        let keep = self.train.partition_point(|r| r.step < step);
        self.superseded_records += self.train.len() - keep;
        self.train.truncate(keep);
    }

    fn supersede_val(&mut self, step: u64) {
        let keep = self.val.partition_point(|r| r.step < step);
        self.superseded_records += self.val.len() - keep;
        self.val.truncate(keep);
    }
}

/// Reads a metrics log (see the [report's documentation](super) for the format).
///
/// Malformed lines and records of other kinds are counted and skipped. Fails if the file cannot be read or
/// holds no training record.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Metrics> {
    let path = path.as_ref();
    let mut reader = LogReader::open(path)?;
    let mut metrics = Metrics::default();
    for entry in reader.by_ref() {
        match entry?.parsed {
            Parsed::Blank => {}
            Parsed::Record(Record::Train(rec)) => metrics.push_train(rec),
            Parsed::Record(Record::Val(rec)) => metrics.push_val(rec),
            Parsed::Record(Record::Storage(rec)) => metrics.storage = Some(rec),
            Parsed::Record(Record::Dense(rec)) => metrics.dense = Some(rec),
            Parsed::Record(Record::Membership(rec)) => metrics.membership.push(rec),
            Parsed::Record(Record::Traffic(rec)) => metrics.traffic = Some(rec),
            Parsed::Record(Record::Checkpoint(_)) | Parsed::Unknown(_) => metrics.other_records += 1,
            Parsed::Malformed(m) => metrics.malformed_lines.push(m.line),
        }
    }
    let line_no = reader.lines_read();
    if metrics.train.is_empty() {
        let mut detail = format!(
            "no training records (`\"kind\":\"train\"`) in {} ({line_no} lines",
            path.display()
        );
        if !metrics.malformed_lines.is_empty() {
            let _ = write!(detail, ", {} malformed", metrics.malformed_lines.len());
        }
        detail.push(')');
        return Err(Error::parse("metrics log", detail));
    }
    Ok(metrics)
}
