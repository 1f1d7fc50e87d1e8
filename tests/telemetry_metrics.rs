//! The `/metrics` endpoint: Prometheus text at GET /metrics with every counter there from the start
//! (at zero), 404 elsewhere, 405 for other methods, host names resolved, and gone with its runtime.
//!
//! One test function: the `metrics` crate has one global recorder per process, installed once.

mod common;

use semoe::actors::Runtime;
use semoe::telemetry::metrics as names;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Send `request` (closing the connection after it) and answer the status and the whole response.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("receive");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (status, response)
}

/// The lines of a series of `name` (with labels or without).
fn series<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .collect()
}

/// The sum of every series of the counter `name`.
fn total(body: &str, name: &str) -> u64 {
    let lines = series(body, name);
    assert!(!lines.is_empty(), "no {name} in {body}");
    lines
        .iter()
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("not a count: {l}"))
        })
        .sum()
}

#[test]
fn the_endpoint_serves_every_counter_from_the_start_and_only_at_get_metrics() {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    // As in `semoe train --metrics-addr`: the runtime starts before the recorder is installed.
    let (workers, moe_blocks, experts) = (2, 2, 4);
    let config = common::small_config(3);
    assert_eq!((config.model.n_layer, config.model.experts), (moe_blocks, experts));
    let runtime = tokio
        .block_on(Runtime::builder(config).workers(workers).build())
        .expect("runtime");
    let handle = names::install().expect("install the recorder");
    assert!(
        names::install().is_err(),
        "a second recorder must be refused, not panic"
    );

    let bad = {
        let _entered = tokio.enter();
        names::serve("no port here", handle.clone())
    };
    let bad = bad.expect_err("an address without a port").to_string();
    assert!(bad.contains("--metrics-addr"), "the error names the flag: {bad}");

    let (server, by_name) = {
        let _entered = tokio.enter();
        let server = names::serve("127.0.0.1:0", handle.clone()).expect("serve");
        let by_name = names::serve("localhost:0", handle.clone()).expect("serve on a host name");
        (server, by_name)
    };
    let addr = server.local_addr();

    // Before the first step: every counter, with every label set known at the start, at zero.
    let (status, before) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{before}");
    assert!(before.contains("text/plain"), "{before}");
    let pairs = workers * workers;
    let tiers = names::TIERS.len();
    for (name, count) in [
        (names::REPLAYS, 1),
        (names::EXPERT_TOKENS, moe_blocks * experts),
        (names::EXPERT_DROPPED, moe_blocks),
        (names::ALLTOALL_BYTES, pairs * names::ALLTOALL_KINDS.len()),
        (names::RESTARTS, workers * names::RESTART_ACTORS.len()),
        (names::TIER_SERVED, workers * tiers),
        (names::TIER_MOVED_BYTES, workers * tiers * (tiers - 1)),
        (names::PREFETCH, workers * names::PREFETCH_OUTCOMES.len()),
        (names::TIER_STALL_MICROS, workers),
    ] {
        let lines = series(&before, name);
        assert_eq!(lines.len(), count, "{name} before the first step: {lines:?}");
        assert!(
            lines.iter().all(|l| l.ends_with(" 0")),
            "{name} starts at zero: {lines:?}"
        );
    }
    for line in [
        "semoe_restarts_total{worker=\"1\",actor=\"gate\"} 0",
        "semoe_expert_tokens_total{block=\"1\",expert=\"3\"} 0",
        "semoe_alltoall_bytes_total{from=\"1\",to=\"0\",kind=\"params\"} 0",
    ] {
        assert!(before.lines().any(|l| l == line), "no {line:?} in {before}");
    }

    // After a step: the step's gauges, and the same series (the zeros were registered with the
    // labels in the recording sites' order, or each counter would now appear twice).
    tokio.block_on(runtime.step()).expect("step");
    names::record_validation(1.25);
    let (status, after) = http(by_name.local_addr(), "GET", "/metrics");
    assert_eq!(status, 200, "{after}");
    for name in [
        names::LOSS,
        names::LEARNING_RATE,
        names::GRAD_NORM,
        names::COMMITTED_STEP,
    ] {
        assert_eq!(series(&after, name).len(), 1, "{name} after a step: {after}");
    }
    assert!(after.lines().any(|l| l == "semoe_val_loss 1.25"), "{after}");
    assert!(after.contains("# HELP semoe_grad_norm"), "described: {after}");
    for name in [
        names::EXPERT_TOKENS,
        names::ALLTOALL_BYTES,
        names::RESTARTS,
        names::TIER_SERVED,
    ] {
        assert_eq!(
            series(&after, name).len(),
            series(&before, name).len(),
            "{name}: {after}"
        );
    }
    let tokens = total(&after, names::EXPERT_TOKENS);
    assert!(tokens > 0, "the step routed tokens: {after}");
    // Histograms are rendered as histograms (buckets), not as summaries of the last minute.
    assert!(after.contains("# TYPE semoe_step_seconds histogram"), "{after}");
    assert!(after.contains("semoe_step_seconds_bucket{le=\"0.01\"}"), "{after}");
    assert!(after.lines().any(|l| l == "semoe_step_seconds_count 1"), "{after}");

    // A step replayed by a runtime rebuilt from the state before it (as a multi-process run does
    // after a lost worker) is not reported again; the step after it is.
    let rebuilt = tokio
        .block_on(
            Runtime::builder(common::small_config(3))
                .workers(workers)
                .reported_steps(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)))
                .build(),
        )
        .expect("rebuilt runtime");
    tokio.block_on(rebuilt.step()).expect("the replayed step");
    let (_, replayed) = http(addr, "GET", "/metrics");
    assert_eq!(total(&replayed, names::EXPERT_TOKENS), tokens, "{replayed}");
    for line in ["semoe_step_seconds_count 1", "semoe_committed_step 1"] {
        assert!(
            replayed.lines().any(|l| l == line),
            "no {line:?} after the replay: {replayed}"
        );
    }
    tokio.block_on(rebuilt.step()).expect("the next step");
    let (_, next) = http(addr, "GET", "/metrics");
    assert!(total(&next, names::EXPERT_TOKENS) > tokens, "{next}");
    for line in ["semoe_step_seconds_count 2", "semoe_committed_step 2"] {
        assert!(
            next.lines().any(|l| l == line),
            "no {line:?} after the next step: {next}"
        );
    }
    tokio.block_on(rebuilt.shutdown()).expect("shutdown");

    // Elsewhere, and other methods.
    let (status, response) = http(addr, "GET", "/other");
    assert_eq!(status, 404, "{response}");
    let (status, response) = http(addr, "POST", "/metrics");
    assert_eq!(status, 405, "{response}");
    assert!(response.to_ascii_lowercase().contains("allow: get"), "{response}");

    // The endpoint ends with its runtime.
    tokio.block_on(runtime.shutdown()).expect("shutdown");
    drop(tokio);
    assert!(
        TcpStream::connect_timeout(&addr, TIMEOUT).is_err(),
        "the endpoint still answers after its runtime ended"
    );
    drop((server, by_name));
}
