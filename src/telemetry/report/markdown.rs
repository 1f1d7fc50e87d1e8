//! `report.md`: the report's numbers as Markdown, with links to the plots.

use std::fmt::Write as _;

use super::{DenseRecord, Metrics, ReportSummary, StorageRecord, EXPERTS_SVG, LOSS_SVG, METRICS_FILE, THROUGHPUT_SVG};

/// `1234567` -> `1,234,567`.
pub(super) fn format_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as `1h 02m 03s` (or `2m 03s`, `3.4s`).
fn format_duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "n/a".into();
    }
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let t = s.round() as u64;
    let (h, m, sec) = (t / 3600, t / 60 % 60, t % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

fn format_loss(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "n/a".into()
    }
}

/// The most workers (or members over a run) shown as a matrix of who sent whom; beyond, a row each.
const MATRIX_MEMBERS: usize = 16;

/// The bytes the workers sent each other: a matrix of totals (or, for many, each one's totals),
/// then the totals by kind.
/// Where the traffic figures are live: the run's own metrics in process; over worker processes
/// each worker's endpoint, by its index in the current epoch (the table is by member id).
fn live_figures(members: bool) -> &'static str {
    if members {
        "live, each worker process serves what it sent in its current epoch as the \
         `semoe_alltoall_bytes_total` metric of its own `--metrics-addr` (peers by their index in the epoch)."
    } else {
        "the same figures, live, are the `semoe_alltoall_bytes_total` metric."
    }
}

/// A member's name in the traffic tables: its id, or what the traffic of members gone long ago is
/// summed as.
fn member_label(id: u64) -> String {
    if id == crate::actors::traffic::EARLIER_MEMBERS {
        "earlier members".into()
    } else {
        id.to_string()
    }
}

fn traffic_section(md: &mut String, rec: &crate::train::log::TrafficRecord) {
    use crate::storage::tiers::format_bytes;
    use std::collections::BTreeMap;
    let who = if rec.members { "member" } else { "worker" };
    // A resumed run's counters start where it resumed: the record says which steps it covers.
    let (span, over) = if rec.since > 0 {
        (
            format!("steps {} to {}", rec.since, rec.step),
            format!("over those steps (counted since the run resumed at step {})", rec.since),
        )
    } else {
        (format!("to step {}", rec.step), "over the run".to_string())
    };
    let _ = writeln!(md, "\n## Traffic between workers ({span})\n");
    let mut ids: Vec<u64> = rec.entries.iter().flat_map(|e| [e.from, e.to]).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut cells: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &rec.entries {
        let cell = cells.entry((e.from, e.to)).or_default();
        *cell = cell.saturating_add(e.bytes);
        let kind = kinds.entry(e.kind.as_str()).or_default();
        *kind = kind.saturating_add(e.bytes);
    }
    if ids.len() > MATRIX_MEMBERS {
        // A run with many members over its life (joins after preemptions): a row each, not a
        // matrix of them all (its cells grow with the square, and nobody reads 100 columns).
        let _ = writeln!(
            md,
            "Payload bytes each of the {} {who}s sent and received {over}, all kinds together; {}\n",
            ids.len(),
            live_figures(rec.members)
        );
        let _ = writeln!(md, "| {who} | sent | received |");
        let _ = writeln!(md, "|---|---|---|");
        let mut sent: BTreeMap<u64, u64> = BTreeMap::new();
        let mut received: BTreeMap<u64, u64> = BTreeMap::new();
        for (&(from, to), &b) in &cells {
            let s = sent.entry(from).or_default();
            *s = s.saturating_add(b);
            let r = received.entry(to).or_default();
            *r = r.saturating_add(b);
        }
        for id in &ids {
            let (s, r) = (
                sent.get(id).copied().unwrap_or(0),
                received.get(id).copied().unwrap_or(0),
            );
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                member_label(*id),
                format_bytes(s),
                format_bytes(r)
            );
        }
    } else {
        let _ = writeln!(
            md,
            "Payload bytes each {who} (row) sent each {who} (column) {over}, all kinds together; {}\n",
            live_figures(rec.members)
        );
        let header: Vec<String> = ids.iter().map(|&i| format!("to {}", member_label(i))).collect();
        let _ = writeln!(md, "| {who} | {} | sent |", header.join(" | "));
        let _ = writeln!(md, "|---|{}---|", "---|".repeat(ids.len()));
        for &from in &ids {
            let row: Vec<String> = ids
                .iter()
                .map(|&to| cells.get(&(from, to)).map_or("-".to_string(), |&b| format_bytes(b)))
                .collect();
            let sent = super::summary::total(ids.iter().filter_map(|&to| cells.get(&(from, to))));
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                member_label(from),
                row.join(" | "),
                format_bytes(sent)
            );
        }
    }
    let by_kind: Vec<String> = kinds.iter().map(|(k, b)| format!("{k} {}", format_bytes(*b))).collect();
    let _ = writeln!(md, "\nBy kind: {}.", by_kind.join(", "));
}

/// Sharded dense parameters: what each worker keeps, gathers and holds at the peak.
fn dense_section(md: &mut String, rec: &DenseRecord) {
    use crate::storage::tiers::format_bytes;
    let _ = writeln!(md, "\n## Sharded dense parameters (at step {})\n", rec.step);
    let _ = writeln!(
        md,
        "| worker | kept between steps | gathered from peers | legs gathered | peak held in a step | waited for legs |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (w, d) in rec.workers.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {w} | {} | {} | {} | {} | {:.2} s |",
            format_bytes(d.resident_bytes),
            format_bytes(d.gathered_bytes),
            d.legs,
            format_bytes(d.peak_bytes),
            d.wait_s
        );
    }
}

/// The expert tiers: budgets and peaks, hit rate, prefetch accuracy, stalls, bytes moved.
fn storage_section(md: &mut String, rec: &StorageRecord) {
    use crate::storage::tiers::format_bytes;
    let st = &rec.stats;
    let budget = |b: u64| {
        if b == u64::MAX {
            "unlimited".to_string()
        } else {
            format_bytes(b)
        }
    };
    let _ = writeln!(md, "\n## Expert storage (at step {})\n", rec.step);
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| Expert units | {} of {} |", st.units, format_bytes(st.unit_bytes));
    for (t, name) in ["Device", "Host"].iter().enumerate() {
        let _ = writeln!(
            md,
            "| {name} tier | budget {}, peak {}, now {} |",
            budget(st.budget[t]),
            format_bytes(st.peak[t]),
            format_bytes(st.used[t])
        );
    }
    let _ = writeln!(md, "| Disk tier | {} units now |", st.on_disk);
    let _ = writeln!(
        md,
        "| Served from device / host / disk | {} / {} / {} (hit rate {:.1}%) |",
        st.served_from[0],
        st.served_from[1],
        st.served_from[2],
        100.0 * st.hit_rate()
    );
    if st.prefetched > 0 {
        let _ = writeln!(
            md,
            "| Prefetched | {} (accuracy {:.1}%) |",
            st.prefetched,
            100.0 * st.prefetch_accuracy()
        );
    } else {
        let _ = writeln!(md, "| Prefetched | none |");
    }
    let _ = writeln!(md, "| Stall waiting for experts | {:.1} s |", st.stall_seconds);
    if st.stall_seconds > 0.0 {
        let causes: Vec<String> = crate::storage::tiers::STALL_CAUSES
            .iter()
            .zip(&st.stall_causes)
            .map(|(name, s)| format!("{name} {s:.1} s"))
            .collect();
        let _ = writeln!(md, "| Stall by cause | {} |", causes.join(", "));
    }
    let _ = writeln!(
        md,
        "| Disk read / written | {} / {} |",
        format_bytes(st.disk_read),
        format_bytes(st.disk_written)
    );
    let names = ["device", "host", "disk"];
    let mut moved = Vec::new();
    for (i, from) in names.iter().enumerate() {
        for (j, to) in names.iter().enumerate() {
            if st.moved[i][j] > 0 {
                moved.push(format!("{from} -> {to} {}", format_bytes(st.moved[i][j])));
            }
        }
    }
    if !moved.is_empty() {
        let _ = writeln!(md, "| Moved | {} |", moved.join(", "));
    }
}

pub(super) fn markdown(s: &ReportSummary, metrics: &Metrics, name: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Run report: {name}\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(
        md,
        "| Steps | {} to {} ({} training records, {} validation records) |",
        s.first_step, s.final_step, s.train_records, s.val_records
    );
    let _ = writeln!(
        md,
        "| Mean train loss of the last {} steps | {} nats/byte (last step {}; EMA {:.2} {}) |",
        s.mean_train_loss_steps,
        format_loss(s.mean_train_loss),
        format_loss(s.final_train_loss_raw),
        s.ema_smoothing,
        format_loss(s.final_train_loss)
    );
    match (s.best_val_loss, s.best_val_step) {
        (Some(v), Some(step)) => {
            let _ = writeln!(
                md,
                "| Best validation loss | {} nats/byte at step {step} |",
                format_loss(v)
            );
        }
        _ => {
            let _ = writeln!(md, "| Best validation loss | none logged |");
        }
    }
    if let (Some(v), Some(step)) = (s.final_val_loss, s.final_val_step) {
        let _ = writeln!(
            md,
            "| Final validation loss | {} nats/byte at step {step} |",
            format_loss(v)
        );
    }
    let _ = writeln!(md, "| Total tokens | {} |", format_count(s.total_tokens));
    if s.elapsed_s.is_finite() && s.elapsed_s >= 60.0 {
        let _ = writeln!(
            md,
            "| Wall time | {} ({:.1} s) |",
            format_duration(s.elapsed_s),
            s.elapsed_s
        );
    } else {
        let _ = writeln!(md, "| Wall time | {} |", format_duration(s.elapsed_s));
    }
    let tps = if s.median_tokens_per_s.is_finite() {
        format!("{} tokens/s", format_count(s.median_tokens_per_s.round() as u64))
    } else {
        "n/a".into()
    };
    let _ = writeln!(md, "| Median throughput | {tps} |");

    // A dense model has no expert state to report on.
    if let Some(rec) = metrics.storage.as_ref().filter(|r| r.stats.units > 0) {
        storage_section(&mut md, rec);
    }
    if let Some(rec) = &metrics.dense {
        dense_section(&mut md, rec);
    }
    if !metrics.membership.is_empty() {
        let _ = writeln!(md, "\n## Membership (worker processes)\n");
        let _ = writeln!(
            md,
            "State sent: *handed over* when the workers kept theirs and only what changed owner moved \
             (a join or leave); *whole shares* otherwise (the first epoch, a loss).\n"
        );
        let _ = writeln!(
            md,
            "| epoch | from step | workers | why | state sent |\n|---|---|---|---|---|"
        );
        for m in &metrics.membership {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {}: {} expert units, {} dense tensors, {} |",
                m.epoch,
                m.step,
                m.workers,
                m.why.replace('|', "/"),
                if m.handed_over { "handed over" } else { "whole shares" },
                m.expert_units_sent,
                m.dense_tensors_sent,
                crate::storage::tiers::format_bytes(m.state_bytes_sent)
            );
        }
    }

    if let Some(rec) = &metrics.traffic {
        traffic_section(&mut md, rec);
    }

    let _ = writeln!(md, "\n## Expert load\n");
    if s.layers.is_empty() {
        let _ = writeln!(md, "Dense model: no MoE layers logged.");
    } else {
        let (a, b) = s.layers[0].final_steps;
        let _ = writeln!(
            md,
            "Final load share per expert (kept assignments over steps {a} to {b}; uniform is 1/E) and drop rate \
             (dropped over all assignments).\n"
        );
        let max_e = s.layers.iter().map(|l| l.experts).max().unwrap_or(0);
        let columns = max_e <= 16;
        let mut header = String::from("| MoE layer |");
        let mut rule = String::from("|---|");
        if columns {
            for e in 0..max_e {
                let _ = write!(header, " e{e} |");
                rule.push_str("---|");
            }
        } else {
            header.push_str(" least loaded | most loaded (top 4) |");
            rule.push_str("---|---|");
        }
        header.push_str(" max/uniform | drop rate (final) | drop rate (run) |");
        rule.push_str("---|---|---|");
        let _ = writeln!(md, "{header}\n{rule}");
        for (l, layer) in s.layers.iter().enumerate() {
            let mut row = format!("| {l} |");
            if columns {
                for e in 0..max_e {
                    let cell = layer.final_share.get(e).map_or(String::new(), |x| format!("{x:.3}"));
                    let _ = write!(row, " {cell} |");
                }
            } else {
                // Too many experts for one column each: the extremes.
                let mut order: Vec<(usize, f64)> = layer.final_share.iter().copied().enumerate().collect();
                order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let top: Vec<String> = order.iter().take(4).map(|(e, x)| format!("e{e} {x:.3}")).collect();
                let least = order.last().map_or(String::new(), |(e, x)| format!("e{e} {x:.3}"));
                let _ = write!(row, " {least} | {} |", top.join(", "));
            }
            let max = layer.final_share.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "{row} {:.2} | {:.2}% | {:.2}% |",
                max * layer.experts as f64,
                100.0 * layer.final_drop_rate,
                100.0 * layer.drop_rate
            );
        }
    }

    let _ = writeln!(md, "\n## Plots\n");
    let plots = [
        ("Loss", LOSS_SVG),
        ("Throughput", THROUGHPUT_SVG),
        ("Expert load", EXPERTS_SVG),
    ];
    for (title, file) in plots {
        let _ = writeln!(md, "- [{title}]({file})");
    }
    for (title, file) in plots {
        let _ = writeln!(md, "\n![{title}]({file})");
    }

    if !metrics.malformed_lines.is_empty() || !metrics.oversized_lines.is_empty() || metrics.superseded_records > 0 {
        let _ = writeln!(md, "\n## Log notes\n");
        if !metrics.oversized_lines.is_empty() {
            let shown: Vec<String> = metrics.oversized_lines.iter().take(10).map(|n| n.to_string()).collect();
            let _ = writeln!(
                md,
                "- Left the expert counts of {} training record(s) out of the expert-load heatmap: wider than it holds \
                 ({} layer-expert cells; line {}{}).",
                metrics.oversized_lines.len(),
                super::summary::MAX_GRID_CELLS,
                shown.join(", "),
                if metrics.oversized_lines.len() > 10 { ", ..." } else { "" }
            );
        }
        if !metrics.malformed_lines.is_empty() {
            let shown: Vec<String> = metrics.malformed_lines.iter().take(10).map(|n| n.to_string()).collect();
            let more = if metrics.malformed_lines.len() > 10 {
                ", ..."
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "- Skipped {} malformed line(s) of `{METRICS_FILE}` (line {}{more}).",
                metrics.malformed_lines.len(),
                shown.join(", ")
            );
        }
        if metrics.superseded_records > 0 {
            let _ = writeln!(
                md,
                "- {} record(s) superseded by a resumed run were left out.",
                metrics.superseded_records
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tiers::TierStats;

    /// A run of many members over its life gets a row per member, not a matrix whose cells grow
    /// with the square of them; its totals still add up.
    #[test]
    fn the_traffic_of_many_members_is_a_row_each() {
        use crate::actors::traffic::TrafficEntry;
        let members = 200u64;
        // Each member sent 1 KiB to each of the next 7 (an epoch of 8 at a time).
        let entries = (0..members)
            .flat_map(|from| {
                (1..8).map(move |d| TrafficEntry {
                    from,
                    to: (from + d) % members,
                    kind: "dispatch".into(),
                    bytes: 1024,
                })
            })
            .collect();
        let rec = crate::train::log::TrafficRecord {
            step: 9,
            since: 0,
            members: true,
            entries,
        };
        let mut md = String::new();
        traffic_section(&mut md, &rec);
        assert!(
            md.contains("each of the 200 members sent and received over the run"),
            "{md}"
        );
        assert!(md.contains("| 0 | 7.00 KiB | 7.00 KiB |"), "{md}");
        let rows = md
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| member"))
            .count();
        assert_eq!(rows, 200, "{md}");
        assert!(md.len() < 20_000, "{} bytes", md.len());
        assert!(md.lines().all(|l| l.matches('|').count() <= 4), "a matrix: {md}");
    }

    #[test]
    fn the_traffic_of_earlier_members_is_named() {
        use crate::actors::traffic::{TrafficEntry, EARLIER_MEMBERS};
        let entry = |from, to| TrafficEntry {
            from,
            to,
            kind: "dispatch".into(),
            bytes: 2048,
        };
        let rec = crate::train::log::TrafficRecord {
            step: 9,
            since: 0,
            members: true,
            entries: vec![entry(3, EARLIER_MEMBERS), entry(EARLIER_MEMBERS, 3)],
        };
        let mut md = String::new();
        traffic_section(&mut md, &rec);
        assert!(md.contains("| member | to 3 | to earlier members | sent |"), "{md}");
        assert!(md.contains("| earlier members | 2.00 KiB | - | 2.00 KiB |"), "{md}");
        assert!(!md.contains(&EARLIER_MEMBERS.to_string()), "{md}");
    }

    #[test]
    fn the_storage_section_splits_the_stall_by_cause() {
        let stats = TierStats {
            unit_bytes: 1 << 20,
            units: 8,
            budget: [4 << 20, 2 << 20],
            served_from: [10, 5, 5],
            stall_seconds: 1.5,
            stall_causes: [1.0, 0.25, 0.25, 0.0],
            ..TierStats::default()
        };
        let mut md = String::new();
        storage_section(
            &mut md,
            &StorageRecord {
                step: 3,
                stats: Box::new(stats),
            },
        );
        assert!(md.contains("| Stall waiting for experts | 1.5 s |"), "{md}");
        assert!(
            md.contains(
                "| Stall by cause | load 1.0 s, write-back for room 0.2 s, own write 0.2 s, units in use 0.0 s |"
            ),
            "{md}"
        );
        // No stall, no split.
        let mut md = String::new();
        storage_section(
            &mut md,
            &StorageRecord {
                step: 3,
                stats: Box::new(TierStats::default()),
            },
        );
        assert!(!md.contains("Stall by cause"), "{md}");
    }
}
