//! `semoe serve` over real HTTP on 127.0.0.1: streamed and whole completions equal `generate` byte
//! for byte while sharing the batch, bad requests get a 4xx naming the problem, clients that leave
//! or stop reading lose their slot without harming the server, and the binary shuts down on SIGTERM.
//!
//! The client is a few lines of raw HTTP/1.1 over a `TcpStream`; every wait is bounded.

mod common;

use metrics_exporter_prometheus::PrometheusHandle;
use semoe::infer::{generate, Decode, Emitted, SampleOptions, SeqId};
use semoe::kernels::Cpu;
use semoe::model::gpt::{Gpt, GptConfig};
use semoe::serve::{ServeConfig, Server};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

fn model_config() -> GptConfig {
    GptConfig {
        block_size: 16,
        d_model: 32,
        n_layer: 2,
        n_head: 2,
        d_ff: 64,
        experts: 4,
        k: 2,
        ..GptConfig::default()
    }
}

fn model() -> Gpt<f32> {
    Gpt::init(&model_config(), 3).expect("model")
}

/// The process's one metrics recorder.
fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = semoe::telemetry::metrics::install().expect("install the recorder");
            semoe::telemetry::metrics::register_serve();
            handle
        })
        .clone()
}

/// A server on its own thread and tokio runtime, stopped (and joined) when dropped.
struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<semoe::Result<()>>>,
}

impl Running {
    fn start(config: ServeConfig) -> Running {
        let config = ServeConfig {
            addr: "127.0.0.1:0".into(),
            ..config
        };
        Running::serve(Server::bind(&model(), config).expect("bind"))
    }

    /// A server over `model` rather than the tests' own.
    fn start_model(model: &Gpt<f32>, config: ServeConfig) -> Running {
        let config = ServeConfig {
            addr: "127.0.0.1:0".into(),
            ..config
        };
        Running::serve(Server::bind(model, config).expect("bind"))
    }

    /// A server over a decoder of the test's own.
    fn start_decoder(decoder: Box<dyn Decode>, config: ServeConfig) -> Running {
        let config = ServeConfig {
            addr: "127.0.0.1:0".into(),
            ..config
        };
        Running::serve(Server::bind_decoder(decoder, config).expect("bind"))
    }

    fn serve(server: Server) -> Running {
        let server = server.with_metrics(recorder());
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let tokio = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio");
            tokio.block_on(server.run(async {
                let _ = rx.await;
            }))
        });
        Running {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Shut down and answer what `run` returned; fails the test if the server has not stopped
    /// within [`STOP_LIMIT`].
    fn stop(mut self) -> semoe::Result<()> {
        self.stop.take().map(|s| s.send(()));
        let thread = self.thread.take().expect("running");
        assert!(
            finished_within(&thread, STOP_LIMIT),
            "the server did not stop within {STOP_LIMIT:?}"
        );
        thread.join().expect("the server thread")
    }
}

/// How long a server may take to stop: its grace period and the decoder's bounded wait, with room.
const STOP_LIMIT: Duration = Duration::from_secs(180);

/// Whether `thread` ends within `limit` (polled: a join has no timeout).
fn finished_within<T>(thread: &std::thread::JoinHandle<T>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A server that does not stop is left behind rather than hanging the test (which is
        // failing already, or fails in `stop`).
        if let Some(thread) = self.thread.take() {
            if finished_within(&thread, STOP_LIMIT) {
                let _ = thread.join();
            }
        }
    }
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    stream
}

fn send(stream: &mut TcpStream, method: &str, path: &str, body: &[u8]) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("send the head");
    stream.write_all(body).expect("send the body");
}

/// Undo chunked transfer encoding.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1_000_000 {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size_text = std::str::from_utf8(&raw[..line_end]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("hex size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
    panic!("too many chunks");
}

/// One request on a fresh connection; the whole response.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut stream = connect(addr);
    send(&mut stream, method, path, body);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("receive");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let rest = &raw[split + 4..];
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Reply { status, head, body }
}

fn post(addr: SocketAddr, body: &Value) -> Reply {
    http(addr, "POST", "/v1/completions", body.to_string().as_bytes())
}

fn health(addr: SocketAddr) -> Value {
    let reply = http(addr, "GET", "/health", b"");
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply.json()
}

/// A streamed completion, parsed: the raw bytes, the joined text, the `done` event.
struct Streamed {
    bytes: Vec<u8>,
    text: String,
    done: Value,
    events: usize,
}

fn parse_events(body: &[u8]) -> Streamed {
    let text = std::str::from_utf8(body).expect("events are UTF-8");
    let mut out = Streamed {
        bytes: Vec::new(),
        text: String::new(),
        done: Value::Null,
        events: 0,
    };
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n);
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).expect("data is JSON"));
            }
        }
        let data = data.expect("an event has data");
        match name {
            None => {
                out.events += 1;
                out.text.push_str(data["text"].as_str().expect("text"));
                for b in data["bytes"].as_array().expect("bytes") {
                    out.bytes.push(b.as_u64().expect("a byte") as u8);
                }
            }
            Some("done") => out.done = data,
            Some(other) => panic!("event {other}: {data}"),
        }
    }
    assert!(!out.done.is_null(), "the stream ends with a done event");
    out
}

fn options(max_tokens: usize, temperature: f64, top_k: usize, seed: u64) -> SampleOptions {
    SampleOptions {
        max_tokens,
        temperature,
        top_k,
        seed,
    }
}

fn expected(prompt: &str, opts: &SampleOptions) -> Vec<u8> {
    let cpu = Cpu::new(1).expect("cpu");
    generate(&model(), &cpu, prompt.as_bytes(), opts, |_| Ok(())).expect("generate")
}

fn body(prompt: &str, o: &SampleOptions, stream: bool) -> Value {
    serde_json::json!({
        "prompt": prompt, "max_tokens": o.max_tokens, "temperature": o.temperature,
        "top_k": o.top_k, "seed": o.seed, "stream": stream,
    })
}

/// Poll `/health` until `done` holds (bounded).
fn wait_for(addr: SocketAddr, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = health(addr);
        if done(&h) {
            return h;
        }
        assert!(start.elapsed() < TIMEOUT, "{what}: still {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_streams_equal_generate_byte_for_byte_and_share_the_batch() {
    let server = Running::start(ServeConfig {
        max_batch: 5,
        max_tokens: 10_000_000,
        ..ServeConfig::default()
    });
    // A long stream holds a slot throughout, so that every request below shares the batch
    // whatever the timing (and they start together, to share it with each other too).
    let anchor = endless(server.addr);
    let cases = [
        ("To be, or not", options(600, 0.8, 40, 1)),
        ("", options(500, 1.0, 0, 2)),
        ("HAMLET.\n", options(550, 0.0, 0, 3)),
        ("é€", options(450, 1.5, 10, 4)),
    ];
    let barrier = Arc::new(Barrier::new(cases.len()));
    let addr = server.addr;
    let clients: Vec<_> = cases
        .iter()
        .cloned()
        .map(|(prompt, opts)| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                post(addr, &body(prompt, &opts, true))
            })
        })
        .collect();
    for ((prompt, opts), client) in cases.iter().zip(clients) {
        let reply = client.join().expect("client");
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        assert!(reply
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"));
        let s = parse_events(&reply.body);
        let want = expected(prompt, opts);
        assert_eq!(s.bytes, want, "{prompt:?}: the streamed bytes are generate's");
        assert_eq!(s.text, String::from_utf8_lossy(&want), "{prompt:?}: the text");
        assert!(s.events > 1, "{prompt:?}: streamed in several events");
        assert_eq!(s.done["generated_bytes"], opts.max_tokens);
        assert_eq!(s.done["prompt_bytes"], prompt.len());
    }
    drop(anchor);
    let h = wait_for(addr, "the anchor to be cancelled", |h| h["active"] == 0);
    assert!(
        h["peak_batch"].as_u64().expect("peak") >= 3,
        "the requests never shared the batch with each other (only the anchor's): {h}"
    );
    let metrics = http(addr, "GET", "/metrics", b"");
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    for series in [
        "semoe_serve_requests_total{outcome=\"ok\"}",
        "semoe_serve_active_sequences",
        "semoe_serve_queued_requests",
        "semoe_serve_generated_bytes_total",
        "semoe_serve_batch_size",
        "semoe_serve_step_seconds",
    ] {
        assert!(text.contains(series), "/metrics lacks {series}:\n{text}");
    }
    server.stop().expect("a clean shutdown");
}

#[test]
fn a_whole_response_equals_generate() {
    let server = Running::start(ServeConfig::default());
    let opts = options(200, 0.9, 20, 42);
    let reply = post(server.addr, &body("Once upon", &opts, false));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let v = reply.json();
    let bytes: Vec<u8> = v["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    let want = expected("Once upon", &opts);
    assert_eq!(bytes, want);
    assert_eq!(v["text"], String::from_utf8_lossy(&want).as_ref());
    assert_eq!(v["generated_bytes"], 200);
}

#[test]
fn bad_requests_get_a_4xx_naming_the_problem() {
    let server = Running::start(ServeConfig {
        max_request_bytes: 1024,
        max_tokens: 100,
        ..ServeConfig::default()
    });
    let addr = server.addr;
    let cases: [(&[u8], u16, &str); 7] = [
        (b"{\"prompt\": \"a\"", 400, "not valid JSON"),
        (b"{\"prompt\": \"a\", \"tokens\": 3}", 400, "unknown field \"tokens\""),
        (b"{\"prompt\": \"a\", \"max_tokens\": 101}", 400, "max_tokens"),
        (b"{\"prompt\": \"a\", \"max_tokens\": 0}", 400, "max_tokens"),
        (b"{\"prompt\": \"a\", \"temperature\": -1}", 400, "temperature"),
        (b"{\"prompt\": 5}", 400, "prompt"),
        (b"{\"prompt\": \"a\", \"top_k\": \"x\"}", 400, "top_k"),
    ];
    for (request, status, needle) in cases {
        let reply = http(addr, "POST", "/v1/completions", request);
        assert_eq!(reply.status, status, "{}", String::from_utf8_lossy(request));
        let message = reply.json()["error"].as_str().expect("an error message").to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    let reply = post(addr, &serde_json::json!({ "prompt": "a", "max_tokens": 101 }));
    assert_eq!(reply.json()["field"], "max_tokens");

    let big = serde_json::json!({ "prompt": "x".repeat(3000) }).to_string();
    let reply = http(addr, "POST", "/v1/completions", big.as_bytes());
    assert_eq!(reply.status, 413);
    assert!(reply.json()["error"].as_str().expect("message").contains("1024 bytes"));

    assert_eq!(http(addr, "GET", "/v1/completions", b"").status, 405);
    assert_eq!(http(addr, "POST", "/health", b"").status, 405);
    assert_eq!(http(addr, "DELETE", "/metrics", b"").status, 405);
    assert_eq!(http(addr, "GET", "/nowhere", b"").status, 404);
    // Still serving.
    assert_eq!(
        post(addr, &serde_json::json!({ "prompt": "a", "max_tokens": 5 })).status,
        200
    );
}

#[test]
fn a_body_over_the_limit_is_refused_with_a_413_the_client_can_read() {
    let server = Running::start(ServeConfig {
        max_request_bytes: 1024,
        ..ServeConfig::default()
    });
    // Several MiB sent whole before reading, as a plain client does: the server must read what
    // it refuses, or its close resets the connection and the client never sees why. Declared
    // by its length, then sent in chunks with no length declared.
    let big = vec![b' '; 8 << 20];
    let reply = http(server.addr, "POST", "/v1/completions", &big);
    assert_eq!(reply.status, 413, "{}", reply.head);
    assert!(reply.json()["error"].as_str().expect("message").contains("1024 bytes"));

    let mut stream = connect(server.addr);
    let head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("send the head");
    let chunk = vec![b' '; 64 << 10];
    for _ in 0..128 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .expect("chunk size");
        stream.write_all(&chunk).expect("chunk");
        stream.write_all(b"\r\n").expect("chunk end");
    }
    stream.write_all(b"0\r\n\r\n").expect("last chunk");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("1024 bytes"), "{text}");

    // A client that waits for `100 Continue` before sending a body declared too large is
    // answered at once, not asked for the body.
    let mut stream = connect(server.addr);
    let head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 5000\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("send the head");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[test]
fn a_body_over_the_limit_sent_too_slowly_is_still_a_413() {
    let server = Running::start(ServeConfig {
        max_request_bytes: 1024,
        client_timeout: Duration::from_secs(1),
        ..ServeConfig::default()
    });
    let mut stream = connect(server.addr);
    let head = "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("send the head");
    stream.write_all(&[b' '; 4096]).expect("a part of the body");
    // The rest never comes within the client timeout: the drain ends, and the answer is why the
    // body was refused, not that it was slow.
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("the answer");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

/// A server whose requests run long enough to be cut short.
fn long_server(client_timeout: Duration) -> Running {
    Running::start(ServeConfig {
        max_batch: 1,
        max_tokens: 10_000_000,
        client_timeout,
        ..ServeConfig::default()
    })
}

fn endless(addr: SocketAddr) -> TcpStream {
    let mut stream = connect(addr);
    let request = serde_json::json!({ "prompt": "a", "max_tokens": 10_000_000, "stream": true });
    send(&mut stream, "POST", "/v1/completions", request.to_string().as_bytes());
    let mut first = [0u8; 256];
    let n = stream.read(&mut first).expect("the first bytes");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    wait_for(addr, "the stream to start", |h| h["active"] == 1);
    stream
}

/// The status of `GET /health` on a fresh connection, or `None` when the connection was closed
/// or reset without an answer (a refused connection may be closed before the request is read).
fn try_health(addr: SocketAddr) -> Option<u16> {
    let mut stream = connect(addr);
    let head = "GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    let _ = stream.write_all(head.as_bytes());
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn connections_beyond_the_limit_get_a_503_and_a_freed_place_is_taken_again() {
    let server = Running::start(ServeConfig {
        max_connections: 2,
        ..ServeConfig::default()
    });
    let addr = server.addr;
    // Two idle connections hold both places (accepted in order, before the third).
    let held: Vec<TcpStream> = (0..2).map(|_| connect(addr)).collect();
    let mut third = connect(addr);
    let mut raw = Vec::new();
    third.read_to_end(&mut raw).expect("the refusal, then the end");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("2 connections open"), "{text}");
    drop(held);
    // Their places come back once the server sees them closed.
    let deadline = Instant::now() + TIMEOUT;
    let mut statuses = Vec::new();
    loop {
        let status = try_health(addr);
        statuses.push(status);
        if status == Some(200) {
            break;
        }
        assert!(
            matches!(status, Some(503) | None),
            "only refusals before a place is free: {statuses:?}"
        );
        assert!(Instant::now() < deadline, "no place came back: {statuses:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.stop().expect("stopped");
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let server = long_server(Duration::from_secs(10));
    let addr = server.addr;
    let stream = endless(addr);
    drop(stream);
    wait_for(addr, "the slot to be freed", |h| h["active"] == 0 && h["queued"] == 0);
    let reply = post(addr, &serde_json::json!({ "prompt": "b", "max_tokens": 20 }));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json()["generated_bytes"], 20);
}

#[test]
fn a_client_that_stops_reading_is_cancelled_after_the_client_timeout() {
    let server = Running::start(ServeConfig {
        max_batch: 1,
        max_tokens: 10_000_000,
        client_timeout: Duration::from_millis(300),
        grace: Duration::from_secs(120),
        ..ServeConfig::default()
    });
    let addr = server.addr;
    let stream = endless(addr);
    // The socket buffers fill, then the channel, then the timeout runs out.
    wait_for(addr, "the stalled stream to be cancelled", |h| h["active"] == 0);
    let reply = post(addr, &serde_json::json!({ "prompt": "c", "max_tokens": 20 }));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    // Its connection was cut too (a write that could not proceed within the client timeout), so
    // it does not hold the shutdown for the 120 s grace period. The client still holds its socket.
    let start = Instant::now();
    server.stop().expect("a clean shutdown");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the shutdown waited {:?} for the stalled connection",
        start.elapsed()
    );
    drop(stream);
}

/// A server that decodes one sequence at a time, with `queue` requests waiting at most.
fn one_at_a_time(queue: usize) -> Running {
    Running::start(ServeConfig {
        max_batch: 1,
        queue,
        max_tokens: 10_000_000,
        ..ServeConfig::default()
    })
}

/// A streamed request of `max_tokens` bytes sent on a fresh connection, its answer not read.
fn stream_request(addr: SocketAddr, prompt: &str, max_tokens: usize) -> TcpStream {
    let mut stream = connect(addr);
    let request = serde_json::json!({ "prompt": prompt, "max_tokens": max_tokens, "stream": true });
    send(&mut stream, "POST", "/v1/completions", request.to_string().as_bytes());
    stream
}

#[test]
fn requests_whose_client_left_while_queued_give_their_place_back() {
    let server = one_at_a_time(2);
    let addr = server.addr;
    let running = endless(addr);
    // Two requests fill the queue, and then their clients leave.
    let queued: Vec<TcpStream> = ["x", "y"].iter().map(|p| stream_request(addr, p, 5)).collect();
    wait_for(addr, "both requests to be queued", |h| h["queued"] == 2);
    drop(queued);
    // They leave the queue while the first request still runs.
    wait_for(addr, "the departed requests to leave the queue", |h| {
        h["queued"] == 0 && h["active"] == 1
    });
    let mut waiting = stream_request(addr, "z", 5);
    wait_for(addr, "a new request to be queued", |h| h["queued"] == 1);
    drop(running);
    let mut raw = Vec::new();
    waiting.read_to_end(&mut raw).expect("the queued request's answer");
    assert!(String::from_utf8_lossy(&raw).contains("event: done"));
}

/// A decoder whose every step fails (as a ring that cannot read its checkpoint does), or panics.
struct Broken {
    panics: bool,
    vocab: usize,
    active: usize,
    /// The failure lasts (as a ring's whose read failed or hung) once a step has met it.
    lasting: bool,
    failed: bool,
}

impl Decode for Broken {
    fn max_batch(&self) -> usize {
        1
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn active(&self) -> usize {
        self.active
    }
    fn has_room(&self) -> bool {
        self.active == 0
    }
    fn admit(&mut self, _prompt: &[u8], _opts: &SampleOptions) -> semoe::Result<SeqId> {
        self.active = 1;
        Ok(0)
    }
    fn cancel(&mut self, _id: SeqId) -> bool {
        std::mem::replace(&mut self.active, 0) == 1
    }
    fn step(&mut self) -> semoe::Result<Vec<Emitted>> {
        if self.panics {
            panic!("a bug in the decoder (this panic is the test's)");
        }
        self.failed = true;
        Err(semoe::Error::runtime(
            "cannot read piece Expert(1, 3) of the checkpoint",
        ))
    }
    fn broken(&self) -> Option<String> {
        (self.lasting && self.failed).then(|| "piece Expert(1, 3) did not load in 120 s".to_string())
    }
}

fn broken_server(panics: bool, vocab: usize) -> Running {
    let decoder = Broken {
        panics,
        vocab,
        active: 0,
        lasting: false,
        failed: false,
    };
    Running::start_decoder(Box::new(decoder), ServeConfig::default())
}

#[test]
fn a_decoder_that_cannot_read_its_weights_any_more_is_reported_failed_for_good() {
    let decoder = Broken {
        panics: false,
        vocab: 256,
        active: 0,
        lasting: true,
        failed: false,
    };
    let server = Running::start_decoder(Box::new(decoder), ServeConfig::default());
    let addr = server.addr;
    assert_eq!(health(addr)["status"], "ok");
    let reply = post(addr, &serde_json::json!({ "prompt": "a", "max_tokens": 5 }));
    assert_eq!(reply.status, 500, "{}", String::from_utf8_lossy(&reply.body));
    let reply = http(addr, "GET", "/health", b"");
    assert_eq!(reply.status, 503, "{}", String::from_utf8_lossy(&reply.body));
    // "failed" (for good), not "failing" (for a while after the step).
    assert_eq!(reply.json()["status"], "failed");
    assert!(reply.json()["error"]
        .as_str()
        .expect("error")
        .contains("did not load in 120 s"));
    server.stop().expect("a clean shutdown");
}

#[test]
fn a_failing_decoder_answers_500_and_health_says_so() {
    let server = broken_server(false, 256);
    let addr = server.addr;
    assert_eq!(health(addr)["status"], "ok");
    let reply = post(addr, &serde_json::json!({ "prompt": "a", "max_tokens": 5 }));
    assert_eq!(reply.status, 500, "{}", String::from_utf8_lossy(&reply.body));
    let message = reply.json()["error"].as_str().expect("message").to_string();
    assert!(message.contains("cannot read piece Expert(1, 3)"), "{message}");
    let reply = http(addr, "GET", "/health", b"");
    assert_eq!(reply.status, 503, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json()["status"], "failing");
    assert!(reply.json()["error"].as_str().expect("error").contains("Expert(1, 3)"));
    // Streamed: the error event names it too.
    let reply = post(
        addr,
        &serde_json::json!({ "prompt": "a", "max_tokens": 5, "stream": true }),
    );
    let text = String::from_utf8_lossy(&reply.body).to_string();
    assert!(text.contains("event: error") && text.contains("Expert(1, 3)"), "{text}");
    server.stop().expect("a clean shutdown");
}

#[test]
fn a_decoder_thread_that_panicked_is_reported_and_refuses_requests() {
    let server = broken_server(true, 256);
    let addr = server.addr;
    let reply = post(addr, &serde_json::json!({ "prompt": "a", "max_tokens": 5 }));
    assert_eq!(reply.status, 500, "{}", String::from_utf8_lossy(&reply.body));
    let message = reply.json()["error"].as_str().expect("message").to_string();
    assert!(message.contains("the decoder thread panicked"), "{message}");
    let start = Instant::now();
    let failed = loop {
        let reply = http(addr, "GET", "/health", b"");
        if reply.status == 503 {
            break reply.json();
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "health still {}",
            String::from_utf8_lossy(&reply.body)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(failed["status"], "failed");
    // The request it held is out of the figures (they read 1 active for good before).
    assert_eq!(failed["active"], 0, "{failed}");
    assert_eq!(failed["queued"], 0, "{failed}");
    let reply = post(addr, &serde_json::json!({ "prompt": "b", "max_tokens": 5 }));
    assert_eq!(reply.status, 503);
    assert!(reply.json()["error"]
        .as_str()
        .expect("message")
        .contains("decoder thread has stopped"));
    let e = server.stop().expect_err("the panic is reported");
    assert!(e.to_string().contains("panicked"), "{e}");
}

#[test]
fn a_prompt_byte_outside_the_vocabulary_is_a_400_naming_the_prompt() {
    let server = broken_server(false, 128);
    let reply = post(
        server.addr,
        &serde_json::json!({ "prompt": "ab\u{e9}", "max_tokens": 5 }),
    );
    assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(&reply.body));
    let value = reply.json();
    assert_eq!(value["field"], "prompt");
    let message = value["error"].as_str().expect("message");
    assert!(
        message.contains("byte 2") && message.contains("vocabulary of 128"),
        "{message}"
    );
    // An empty prompt starts from a newline (byte 10), outside a vocabulary of 8: refused as the
    // request's fault, before it reaches the batch (where it failed every sequence in it).
    let tiny = broken_server(false, 8);
    let reply = post(tiny.addr, &serde_json::json!({ "prompt": "", "max_tokens": 5 }));
    assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(&reply.body));
    let value = reply.json();
    assert_eq!(value["field"], "prompt");
    let message = value["error"].as_str().expect("message");
    assert!(
        message.contains("empty prompt") && message.contains("vocabulary of 8"),
        "{message}"
    );
}

/// The `semoe` binary, killed and reaped when dropped (also when the test fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves_on_port_0_and_exits_0_on_sigterm() {
    // The whole model in memory, then streamed through a ring of a few sections: the same bytes.
    for ring in [false, true] {
        serve_binary(ring);
    }
}

#[test]
fn an_address_in_use_is_refused_before_the_checkpoint_is_read() {
    // The address is taken and the checkpoint does not exist: the address is what is named, as a
    // server whose model takes minutes to load must not fail over its address only after them.
    let tmp = common::TempDir::new("serve-addr-taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let missing = tmp.path().join("no-such-checkpoint");
    let args: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        "--checkpoint".into(),
        missing.into(),
        "--addr".into(),
        addr.clone().into(),
    ];
    let out = common::procs::output_within(tmp.path(), "serve", &args, TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started on a taken address: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && !stderr.contains("no-such-checkpoint"),
        "the error should name the address, not the checkpoint: {stderr}"
    );
}

#[test]
fn a_bound_address_refuses_connections_until_the_server_is_built() {
    // `semoe serve` binds before its model loads, and listens only once it is ready: a client
    // (or a TCP readiness probe) meanwhile is refused, not left waiting in the backlog.
    let listener = semoe::serve::Listener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr();
    let err = TcpStream::connect_timeout(&addr, TIMEOUT).expect_err("nothing listens yet");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let decoder = semoe::infer::BatchDecoder::new(&model(), Cpu::new(1).expect("cpu"), 2).expect("decoder");
    let server = Server::with_listener(listener, Box::new(decoder), ServeConfig::default()).expect("server");
    assert_eq!(server.local_addr(), addr);
    TcpStream::connect_timeout(&addr, TIMEOUT).expect("listening once the server is built");
}

/// The least Device budget of a routed ring over `checkpoint`: its resident bytes and two sections.
fn least_ring_budget(checkpoint: &std::path::Path) -> u64 {
    use semoe::infer::{ModelFile, Prefetch, RingLoad, RingOptions, RingWeights};
    let probe = RingWeights::new(
        ModelFile::open(checkpoint).expect("open"),
        &RingOptions {
            device_budget: u64::MAX / 4,
            host_budget: 0,
            prefetch: Prefetch::Routed,
            io_threads: 1,
            // What `semoe serve --device-budget ... --max-batch 2` uses.
            load: RingLoad::default(),
            batch: 2,
        },
    )
    .expect("probe ring");
    let s = probe.stats();
    s.resident_bytes + 2 * s.section_bytes
}

fn serve_binary(through_ring: bool) {
    let tmp = common::TempDir::new("serve-binary");
    let mut config = common::small_config(1);
    config.model = model_config();
    let model = model();
    let shapes: Vec<Vec<usize>> = model.tensors().into_iter().map(|(_, s, _)| s).collect();
    let optimizer = semoe::train::AdamW::new(config.optimizer.clone(), &shapes).expect("optimizer");
    let checkpoint = semoe::train::trainer::write_checkpoint(tmp.path(), &config, &model, &optimizer, 0.0, None)
        .expect("checkpoint");

    let ring: Vec<String> = if through_ring {
        let budget = least_ring_budget(&checkpoint).to_string();
        vec!["--device-budget".into(), budget, "--prefetch".into(), "routed".into()]
    } else {
        Vec::new()
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_semoe"))
        .args(["serve", "--checkpoint"])
        .arg(&checkpoint)
        .args(["--addr", "127.0.0.1:0", "--max-batch", "2"])
        .args(&ring)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start semoe serve");
    let mut child = Child(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(TIMEOUT).expect("the address line");
    let addr: SocketAddr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("an address");

    let opts = options(30, 0.8, 40, 5);
    let reply = post(addr, &body("hi", &opts, false));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.json()["generated_bytes"], 30);
    let bytes: Vec<u8> = reply.json()["bytes"]
        .as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("byte") as u8)
        .collect();
    assert_eq!(bytes, expected("hi", &opts), "{ring:?}: the bytes of generate");
    // The decoder thread counts the outcome just after it hands over the last event.
    let start = Instant::now();
    loop {
        let metrics = http(addr, "GET", "/metrics", b"");
        let text = String::from_utf8_lossy(&metrics.body).to_string();
        if text.contains("semoe_serve_requests_total{outcome=\"ok\"} 1") {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "the request is not counted:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SAFETY: sends a signal to the child this test started (and has not reaped yet).
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert_eq!(err.contains("ring: 2 sections"), through_ring, "{ring:?}: {err}");
}

#[test]
fn shutdown_lets_a_request_in_flight_finish_and_refuses_new_connections() {
    let server = Running::start(ServeConfig {
        max_tokens: 100_000,
        grace: Duration::from_secs(15),
        ..ServeConfig::default()
    });
    let addr = server.addr;
    let opts = options(20_000, 0.8, 40, 9);
    let client = std::thread::spawn(move || post(addr, &body("x", &opts, true)));
    wait_for(addr, "the stream to start", |h| h["active"] == 1);
    server.stop().expect("a clean shutdown");
    let reply = client.join().expect("client");
    assert_eq!(reply.status, 200);
    let s = parse_events(&reply.body);
    assert_eq!(
        s.done["generated_bytes"], 20_000,
        "the request in flight ran to its end"
    );
    assert!(
        TcpStream::connect_timeout(&addr, TIMEOUT).is_err(),
        "no longer listening"
    );
}

#[test]
fn shutdown_cancels_what_outlives_the_grace_period() {
    let server = Running::start(ServeConfig {
        max_tokens: 10_000_000,
        grace: Duration::from_millis(200),
        ..ServeConfig::default()
    });
    let addr = server.addr;
    let client = std::thread::spawn(move || {
        post(
            addr,
            &serde_json::json!({ "prompt": "a", "max_tokens": 10_000_000, "stream": true }),
        )
    });
    wait_for(addr, "the stream to start", |h| h["active"] == 1);
    let start = Instant::now();
    server.stop().expect("a clean shutdown");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
    let reply = client.join().expect("client");
    // The last bytes of the body (decoded after cutting: the stream's text may hold any byte).
    let tail = String::from_utf8_lossy(&reply.body[reply.body.len().saturating_sub(200)..]);
    assert!(
        tail.contains("event: error") && tail.contains("shutting down"),
        "{tail}"
    );
}

#[test]
fn a_full_queue_answers_503() {
    let server = one_at_a_time(1);
    let addr = server.addr;
    let running = endless(addr);
    let mut waiting = stream_request(addr, "q", 5);
    wait_for(addr, "the second request to wait", |h| h["queued"] == 1);
    let reply = post(addr, &serde_json::json!({ "prompt": "r", "max_tokens": 5 }));
    assert_eq!(reply.status, 503);
    assert!(reply.json()["error"].as_str().expect("message").contains("queue"));
    assert!(reply.head.to_ascii_lowercase().contains("retry-after: 1"));
    drop(running);
    // The waiting request then runs.
    let mut raw = Vec::new();
    waiting.read_to_end(&mut raw).expect("the queued request's answer");
    assert!(String::from_utf8_lossy(&raw).contains("event: done"));
}

#[test]
fn a_client_slow_to_send_its_request_is_cut_off_after_the_client_timeout() {
    let server = long_server(Duration::from_millis(300));
    let addr = server.addr;
    // Headers that never end: the connection is closed.
    let mut stream = connect(addr);
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n")
        .expect("send");
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "open for {:?}",
        start.elapsed()
    );
    // A body that never ends: 408.
    let mut stream = connect(addr);
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        .expect("send");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("client_timeout"), "{reply}");
}

#[test]
fn a_client_that_disconnects_while_waiting_for_a_whole_response_frees_its_slot() {
    let server = long_server(Duration::from_secs(10));
    let addr = server.addr;
    let mut stream = connect(addr);
    let request = serde_json::json!({ "prompt": "a", "max_tokens": 10_000_000 });
    send(&mut stream, "POST", "/v1/completions", request.to_string().as_bytes());
    wait_for(addr, "the request to start", |h| h["active"] == 1);
    drop(stream);
    wait_for(addr, "the slot to be freed", |h| h["active"] == 0);
}

#[test]
fn a_request_whose_own_values_are_not_finite_fails_alone() {
    // The tests' model with an embedding row of NaN for a byte that greedy decoding from "To be"
    // never draws in its first 20,000 bytes: a prompt holding that byte meets the NaN at the first
    // gate. A long stream sharing the batch goes on.
    let greedy = options(20_000, 0.0, 0, 1);
    let cpu = Cpu::new(1).expect("cpu");
    let want = generate(&model(), &cpu, b"To be", &greedy, |_| Ok(())).expect("generate");
    let bad = (b'A'..=b'Z')
        .find(|b| !want.contains(b) && !b"To be".contains(b))
        .expect("a capital letter greedy never draws");
    let mut m = model();
    let d = model_config().d_model;
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _, _)| n).collect();
    let wte = names.iter().position(|n| n == "wte").expect("wte tensor");
    m.buffers_mut()[wte][usize::from(bad) * d..][..d].fill(f32::NAN);
    let server = Running::start_model(
        &m,
        ServeConfig {
            max_batch: 4,
            max_tokens: 20_000,
            ..ServeConfig::default()
        },
    );
    let addr = server.addr;
    let mut long = connect(addr);
    send(
        &mut long,
        "POST",
        "/v1/completions",
        body("To be", &greedy, true).to_string().as_bytes(),
    );
    wait_for(addr, "the long stream to start", |h| h["active"] == 1);
    let prompt = format!("a{}", char::from(bad));
    let reply = post(addr, &serde_json::json!({ "prompt": prompt, "max_tokens": 5 }));
    assert_eq!(reply.status, 500, "{}", String::from_utf8_lossy(&reply.body));
    let message = reply.json()["error"].as_str().expect("message").to_string();
    assert!(message.contains("the gate of block 0"), "{message}");
    // The long stream was not failed with it, and the server is not failing.
    let h = health(addr);
    assert_eq!(h["status"], "ok", "{h}");
    let mut raw = Vec::new();
    long.read_to_end(&mut raw).expect("the long stream");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head");
    assert!(String::from_utf8_lossy(&raw[..split]).starts_with("HTTP/1.1 200"));
    let streamed = parse_events(&dechunk(&raw[split + 4..]));
    assert_eq!(streamed.bytes, want, "the long stream's bytes");
    let metrics = String::from_utf8_lossy(&http(addr, "GET", "/metrics", b"").body).to_string();
    assert!(
        metrics.contains("semoe_serve_requests_total{outcome=\"error\"}"),
        "{metrics}"
    );
    server.stop().expect("a clean shutdown");
}
