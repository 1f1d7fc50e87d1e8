//! Reading the metrics log into [`Metrics`]: the records the report uses, with those a resumed run
//! superseded removed (see the [report's documentation](super)).

use std::fmt::Write as _;
use std::io::Seek as _;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::train::log::{LogReader, Parsed, Record};

use super::summary::{buckets, LoadGrid};
use super::{DenseRecord, StorageRecord, TrainRecord, ValRecord};

/// The parsed metrics log.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Training records in step order (superseded records of a resumed run removed), without
    /// their expert counts (`expert_tokens` and `dropped` are empty): those are summed in
    /// [`Metrics::expert_load`] as the log is read.
    pub train: Vec<TrainRecord>,
    /// The kept records' expert counts summed per heatmap bucket.
    pub expert_load: LoadGrid,
    /// Validation records in step order (superseded records of a resumed run removed).
    pub val: Vec<ValRecord>,
    /// Line numbers (1-based) of the lines that could not be parsed.
    pub malformed_lines: Vec<usize>,
    /// Line numbers (1-based) of training records whose expert counts were wider than the
    /// heatmap holds (`MAX_GRID_CELLS`): their counts are left out, their other figures kept.
    pub oversized_lines: Vec<usize>,
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
    // Two passes, so that no record keeps its expert counts: the first finds which training
    // records a resumed run left standing (and so the heatmap's buckets), the second sums each
    // one's counts into its bucket as it reads it.
    // Both passes read the one file opened here: a log replaced in between (a resume rewrites
    // it) cannot give the second pass other records than the first counted.
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening the metrics log", path, e))?;
    let kept = kept_train_records(LogReader::new(std::io::BufReader::new(&file), path))?;
    (&file)
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Error::io("reading the metrics log", path, e))?;
    let ranges = buckets(kept.len());
    let mut grid = LoadGrid::new(ranges.len());
    let (mut ordinal, mut position, mut bucket) = (0usize, 0usize, 0usize);
    let mut reader = LogReader::new(std::io::BufReader::new(&file), path);
    let mut metrics = Metrics::default();
    for entry in reader.by_ref() {
        let entry = entry?;
        match entry.parsed {
            Parsed::Blank => {}
            Parsed::Record(Record::Train(mut rec)) => {
                if kept.get(position) == Some(&ordinal) {
                    while ranges.get(bucket).is_some_and(|&(_, end)| position >= end) {
                        bucket += 1;
                    }
                    // Counts wider than any heatmap (see `MAX_GRID_CELLS`) are left out, and the
                    // line is named in the report.
                    if !grid.add(bucket, &rec) {
                        metrics.oversized_lines.push(entry.line);
                    }
                    position += 1;
                }
                ordinal += 1;
                rec.expert_tokens = Vec::new();
                rec.dropped = Vec::new();
                metrics.push_train(rec);
            }
            Parsed::Record(Record::Val(rec)) => metrics.push_val(rec),
            Parsed::Record(Record::Storage(rec)) => metrics.storage = Some(rec),
            Parsed::Record(Record::Dense(rec)) => metrics.dense = Some(rec),
            Parsed::Record(Record::Membership(rec)) => metrics.membership.push(rec),
            Parsed::Record(Record::Traffic(rec)) => metrics.traffic = Some(rec),
            Parsed::Record(Record::Checkpoint(_)) | Parsed::Unknown(_) => metrics.other_records += 1,
            Parsed::Malformed(m) => metrics.malformed_lines.push(m.line),
        }
    }
    grid.finish();
    metrics.expert_load = grid;
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

/// The ordinals (among the log's training records, in file order) of those a resumed run left
/// standing: a record logged again for its step, or for an earlier one, drops it and those after.
fn kept_train_records(reader: LogReader<impl std::io::BufRead>) -> Result<Vec<usize>> {
    let mut kept: Vec<(u64, usize)> = Vec::new();
    for (ordinal, step) in reader
        .filter_map(|entry| match entry.map(|e| e.parsed) {
            Ok(Parsed::Record(Record::Train(rec))) => Some(Ok(rec.step)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .enumerate()
    {
        let step = step?;
        if kept.last().is_some_and(|&(last, _)| step <= last) {
            let keep = kept.partition_point(|&(s, _)| s < step);
            kept.truncate(keep);
        }
        kept.push((step, ordinal));
    }
    Ok(kept.into_iter().map(|(_, ordinal)| ordinal).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_records_a_resume_left_standing_count_in_the_expert_load() {
        let dir = std::env::temp_dir().join(format!("semoe-read-two-passes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let line = |step: u64, counts: [u64; 2], dropped: u64| {
            format!(
                "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{step},\"loss\":1.0,\
                 \"tokens_per_s\":100.0,\"expert_tokens\":[[{},{}]],\"dropped\":[{dropped}]}}\n",
                step * 10,
                counts[0],
                counts[1]
            )
        };
        // Steps 1 to 4, then a resume from step 2 logs 3 and 4 again (and a malformed line).
        let mut log = String::new();
        for step in 1..=4 {
            log.push_str(&line(step, [1, 1], 100));
        }
        log.push_str("{not json\n");
        for step in 3..=4 {
            log.push_str(&line(step, [10, 0], 1));
        }
        std::fs::write(&path, log).unwrap();
        let m = read_metrics(&path).unwrap();
        assert_eq!(m.train.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(m.superseded_records, 2);
        assert!(m
            .train
            .iter()
            .all(|r| r.expert_tokens.is_empty() && r.dropped.is_empty()));
        let grid = &m.expert_load;
        assert_eq!(grid.experts, [2]);
        assert_eq!(grid.cells[0].len(), 4, "a bucket per record");
        let per_bucket: Vec<(Vec<u64>, u64)> = grid.cells[0].clone();
        assert_eq!(
            per_bucket,
            [(vec![1, 1], 100), (vec![1, 1], 100), (vec![10, 0], 1), (vec![10, 0], 1)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A record whose counts are wider than any heatmap (a hand-edited or hostile log): its line
    /// is named and the grid stays the size of the others (one such record made
    /// every bucket as wide as it, a thousand times the log's size in memory).
    #[test]
    fn counts_wider_than_any_heatmap_are_named_not_gigabytes() {
        let dir = std::env::temp_dir().join(format!("semoe-read-wide-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let line = |step: u64, layers: usize, experts: usize| {
            let row = vec!["1"; experts].join(",");
            let rows = vec![format!("[{row}]"); layers].join(",");
            format!(
                "{{\"kind\":\"train\",\"step\":{step},\"tokens\":{},\"elapsed_s\":{step},\"loss\":1.0,\
                 \"tokens_per_s\":100.0,\"expert_tokens\":[{rows}],\"dropped\":[]}}\n",
                step * 10
            )
        };
        let wide = super::super::summary::MAX_GRID_CELLS + 1;
        let log = [line(1, 1, 4), line(2, 1, wide), line(3, 2, wide / 2 + 1), line(4, 1, 4)].concat();
        std::fs::write(&path, log).unwrap();
        let m = read_metrics(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(m.train.len(), 4, "the records' other figures are kept");
        assert_eq!(m.oversized_lines, [2, 3]);
        assert!(m.malformed_lines.is_empty());
        assert_eq!(m.expert_load.experts, [4]);
        assert!(m.expert_load.cells[0].iter().all(|(c, _)| c.len() == 4));
    }
}
