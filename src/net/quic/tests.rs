//! Tests of the QUIC transport, over 127.0.0.1 with ephemeral ports. Every wait is bounded.

use super::*;
use crate::error::{Error, Result};
use crate::net::{Inbox, Packet, Payload, Transport, WorkerId};
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A UDP socket on 127.0.0.1, a port the OS chose.
fn local_socket() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("socket")
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// A directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let n: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("semoe-quic-{name}-{}-{n:x}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Frames of `Ack` and one-tensor `Tensors` packets: epoch, from, to, id as u64 LE, then the
/// tensor's floats (LE) if any.
struct TestCodec;

impl PacketCodec for TestCodec {
    fn encode(&self, epoch: u64, p: &Packet) -> Result<Vec<u8>> {
        let floats: &[f32] = match &p.payload {
            Payload::Ack => &[],
            Payload::Tensors(t) if t.len() == 1 && !t[0].1.is_empty() => &t[0].1,
            _ => return Err(Error::runtime("the test codec encodes Ack and one tensor only")),
        };
        let mut out = Vec::with_capacity(32 + 4 * floats.len());
        for v in [epoch, p.from as u64, p.to as u64, p.id] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for f in floats {
            out.extend_from_slice(&f.to_le_bytes());
        }
        Ok(out)
    }

    fn decode(&self, bytes: &[u8], epoch: u64) -> Result<Packet> {
        if bytes.len() < 32 || !bytes.len().is_multiple_of(4) {
            return Err(Error::parse("a test packet", format!("{} bytes", bytes.len())));
        }
        let v = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if v(0) != epoch {
            return Err(Error::parse(
                "a test packet",
                format!("epoch {} in epoch {epoch}", v(0)),
            ));
        }
        let payload = if bytes.len() == 32 {
            Payload::Ack
        } else {
            let floats = bytes[32..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Payload::Tensors(vec![(0, floats)])
        };
        Ok(Packet {
            from: v(1) as usize,
            to: v(2) as usize,
            id: v(3),
            payload,
        })
    }
}

/// [`TestCodec`] that accepts frames of at most this many bytes.
struct BoundedCodec(usize);

impl PacketCodec for BoundedCodec {
    fn encode(&self, epoch: u64, p: &Packet) -> Result<Vec<u8>> {
        TestCodec.encode(epoch, p)
    }

    fn decode(&self, bytes: &[u8], epoch: u64) -> Result<Packet> {
        TestCodec.decode(bytes, epoch)
    }

    fn max_frame(&self) -> usize {
        self.0
    }
}

/// Sends garbage.
struct GarbageCodec;

impl PacketCodec for GarbageCodec {
    fn encode(&self, _epoch: u64, _p: &Packet) -> Result<Vec<u8>> {
        Ok(vec![0xde, 0xad])
    }

    fn decode(&self, _bytes: &[u8], _epoch: u64) -> Result<Packet> {
        Err(Error::parse("garbage", "always"))
    }
}

fn ack(from: WorkerId, to: WorkerId, id: u64) -> Packet {
    Packet {
        from,
        to,
        id,
        payload: Payload::Ack,
    }
}

fn plane(identity: &JobIdentity, token: &str, codec: Arc<dyn PacketCodec>) -> Arc<DataPlane> {
    plane_on(identity, token, codec, false)
}

/// A plane on 127.0.0.1, with the same-host path enabled or not.
fn plane_on(identity: &JobIdentity, token: &str, codec: Arc<dyn PacketCodec>, same_host: bool) -> Arc<DataPlane> {
    let ep = data_plane_endpoint(local_socket(), identity).expect("endpoint");
    let plane = DataPlane::new(ep, token.to_string(), codec).expect("data plane");
    if same_host {
        plane
            .enable_same_host("127.0.0.1".parse().expect("ip"))
            .expect("same-host path");
    }
    Arc::new(plane)
}

/// Every plane's links go the way `same_host` says.
fn assert_paths(planes: &[Arc<DataPlane>], same_host: bool) {
    let want = if same_host { LinkPath::SameHost } else { LinkPath::Quic };
    for (w, p) in planes.iter().enumerate() {
        let paths = p.link_paths();
        assert_eq!(paths.len(), planes.len() - 1, "worker {w}: {paths:?}");
        assert!(paths.iter().all(|&(_, path)| path == want), "worker {w}: {paths:?}");
    }
}

/// Run the test `$name(same_host: bool)` over QUIC and over the same-host path.
macro_rules! both_paths {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(false).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn same_host() {
                super::$name(true).await;
            }
        }
    };
}

fn addrs(planes: &[Arc<DataPlane>]) -> Vec<(WorkerId, SocketAddr)> {
    planes
        .iter()
        .enumerate()
        .map(|(w, p)| (w, p.local_addr().expect("addr")))
        .collect()
}

/// Start `epoch` on every plane at once.
async fn start_all(planes: &[Arc<DataPlane>], epoch: u64, deadline: Duration) -> Vec<Result<(QuicTransport, Inbox)>> {
    let peers = addrs(planes);
    let tasks: Vec<_> = planes
        .iter()
        .enumerate()
        .map(|(w, p)| {
            let (p, peers, n) = (p.clone(), peers.clone(), planes.len());
            tokio::spawn(async move { p.start_epoch(w, epoch, peers, n, deadline).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within("start_epoch", t).await.expect("start task"));
    }
    out
}

#[test]
fn ticket_round_trip_with_mode_0600() {
    let dir = Dir::new("ticket");
    let identity = JobIdentity::generate().expect("identity");
    let ticket = JoinTicket::new("127.0.0.1:4433".parse().expect("addr"), &identity);
    assert_eq!(ticket.token.len(), 64);
    assert_eq!(ticket.cert_sha256, identity.fingerprint());
    assert_ne!(
        JoinTicket::new(ticket.addr, &identity).token,
        ticket.token,
        "tokens are random"
    );
    let path = dir.0.join("job.ticket");
    ticket.write(&path).expect("write");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(JoinTicket::read(&path).expect("read"), ticket);
    // Overwriting works, and leaves no temporary file behind.
    ticket.write(&path).expect("rewrite");
    assert_eq!(std::fs::read_dir(&dir.0).expect("list").count(), 1);
    assert!(ticket.token_matches(&ticket.token.clone()));
    assert!(!ticket.token_matches(&ticket.token[1..]));
    assert!(!ticket.token_matches(&"0".repeat(64)));
    assert!(!format!("{ticket:?}").contains(&ticket.token), "Debug hides the token");
}

#[test]
fn garbled_tickets_are_refused_with_the_reason() {
    let dir = Dir::new("garbled");
    let missing = JoinTicket::read(&dir.0.join("nope")).expect_err("missing");
    assert!(missing.to_string().contains("nope"), "{missing}");

    let hex = "ab".repeat(32);
    let cases = [
        ("not a ticket\n".to_string(), "not a join ticket"),
        (String::new(), "empty"),
        (
            format!("{TICKET_HEADER}\naddr = nowhere\ntoken = {hex}\ncert_sha256 = {hex}\n"),
            "field addr",
        ),
        (
            format!("{TICKET_HEADER}\naddr = 127.0.0.1:1\ncert_sha256 = {hex}\n"),
            "field token is missing",
        ),
        (
            format!("{TICKET_HEADER}\naddr = 127.0.0.1:1\ntoken = {hex}\ncert_sha256 = xyz\n"),
            "field cert_sha256",
        ),
        (
            format!("{TICKET_HEADER}\naddr = 127.0.0.1:1\ncolour = blue\n"),
            "unknown field \"colour\"",
        ),
        (format!("{TICKET_HEADER}\njunk\n"), "line 2"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("t{i}"));
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let err = JoinTicket::read(&path).expect_err(expect);
        assert!(err.to_string().contains(expect), "case {i}: {err}");
    }

    let identity = JobIdentity::generate().expect("identity");
    let path = dir.0.join("open");
    JoinTicket::new("127.0.0.1:1".parse().expect("addr"), &identity)
        .write(&path)
        .expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = JoinTicket::read(&path).expect_err("group/other readable");
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_certificate_is_refused() {
    let job = JobIdentity::generate().expect("identity");
    let impostor = JobIdentity::generate().expect("identity");
    assert_ne!(job.fingerprint(), impostor.fingerprint());
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = endpoint(any, &impostor, &impostor.fingerprint()).expect("server");
    let server_addr = server.local_addr().expect("addr");
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        conn.closed().await;
                    }
                });
            }
        }
    });
    let client = endpoint(any, &job, &job.fingerprint()).expect("client");
    let err = within("connect", async {
        client.connect(server_addr, SERVER_NAME).expect("connecting").await
    })
    .await
    .expect_err("a certificate that is not pinned");
    assert!(err.to_string().contains("did not match"), "{err}");

    // The pinned certificate is accepted.
    let honest = endpoint(any, &impostor, &impostor.fingerprint()).expect("client");
    let conn = within("connect", async {
        honest.connect(server_addr, SERVER_NAME).expect("connecting").await
    })
    .await
    .expect("the pinned certificate");
    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    accept.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_round_trip_and_bad_frames_are_errors() {
    let id = JobIdentity::generate().expect("identity");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = endpoint(any, &id, &id.fingerprint()).expect("server");
    let client = endpoint(any, &id, &id.fingerprint()).expect("client");
    let server_addr = server.local_addr().expect("addr");
    let (conn, incoming) = within("connect", async {
        let incoming = tokio::spawn({
            let server = server.clone();
            async move { server.accept().await.expect("incoming").await.expect("handshake") }
        });
        let conn = client
            .connect(server_addr, SERVER_NAME)
            .expect("connecting")
            .await
            .expect("connect");
        (conn, incoming.await.expect("accept task"))
    })
    .await;

    // A good frame, then a length over the limit.
    let mut send = conn.open_uni().await.expect("open");
    write_frame(&mut send, b"hello").await.expect("write");
    send.write_all(&(1u64 << 40).to_le_bytes()).await.expect("write");
    let mut recv = within("accept", incoming.accept_uni()).await.expect("stream");
    let got = within("read", read_frame(&mut recv, 16, "a test frame"))
        .await
        .expect("read");
    assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    let err = within("read", read_frame(&mut recv, 16, "a test frame"))
        .await
        .expect_err("too long");
    assert!(err.to_string().contains("over the limit"), "{err}");

    // A truncated frame.
    let mut send = conn.open_uni().await.expect("open");
    send.write_all(&10u64.to_le_bytes()).await.expect("write");
    send.write_all(b"abc").await.expect("write");
    send.finish().expect("finish");
    let mut recv = within("accept", incoming.accept_uni()).await.expect("stream");
    let err = within("read", read_frame(&mut recv, 16, "a test frame"))
        .await
        .expect_err("truncated");
    assert!(err.to_string().contains("ended 3 bytes into"), "{err}");

    // A clean end before a frame.
    let mut send = conn.open_uni().await.expect("open");
    write_frame(&mut send, b"").await.expect("write");
    send.finish().expect("finish");
    let mut recv = within("accept", incoming.accept_uni()).await.expect("stream");
    let got = within("read", read_frame(&mut recv, 16, "a test frame"))
        .await
        .expect("read");
    assert_eq!(got, Some(Vec::new()));
    let got = within("read", read_frame(&mut recv, 16, "a test frame"))
        .await
        .expect("read");
    assert_eq!(got, None);
}

/// Every worker sends `n` packets to every worker (itself included); each inbox gets them all, in
/// order per sender.
async fn exchange(nets: &mut [(QuicTransport, Inbox)], n: u64) {
    let workers = nets.len();
    for (t, _) in nets.iter() {
        assert_eq!(t.workers(), workers);
        for id in 0..n {
            for to in 0..workers {
                t.send(ack(t.id(), to, id)).expect("send");
            }
        }
    }
    for (me, (_, inbox)) in nets.iter_mut().enumerate() {
        let mut next = vec![0u64; workers];
        for _ in 0..n * workers as u64 {
            let p = within("a packet", inbox.recv()).await.expect("inbox open");
            assert_eq!(p.to, me);
            assert_eq!(
                p.id, next[p.from],
                "worker {me}: packets from worker {} out of order",
                p.from
            );
            next[p.from] += 1;
        }
        assert_eq!(next, vec![n; workers]);
        assert!(inbox.try_recv().is_err(), "nothing more");
    }
}

both_paths!(three_planes_exchange_in_order_across_two_epochs);

async fn three_planes_exchange_in_order_across_two_epochs(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes: Vec<_> = (0..3)
        .map(|_| plane_on(&id, "secret", Arc::new(TestCodec), same_host))
        .collect();
    let mut events: Vec<_> = planes.iter().map(|p| p.events().expect("events")).collect();
    assert!(planes[0].events().is_none(), "one consumer");

    let mut nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    assert_paths(&planes, same_host);
    exchange(&mut nets, 200).await;
    let err = nets[0].0.send(ack(0, 7, 0)).expect_err("no such worker");
    assert!(err.to_string().contains("worker 7"), "{err}");
    let err = nets[0].0.send(ack(1, 2, 0)).expect_err("not from me");
    assert!(err.to_string().contains("worker 1"), "{err}");

    // The next epoch on the same planes (epochs need not be consecutive).
    let old = nets;
    let mut nets: Vec<_> = start_all(&planes, 3, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 3"))
        .collect();
    assert_paths(&planes, same_host);
    exchange(&mut nets, 50).await;
    assert_eq!(nets[2].0.epoch(), 3);
    // The old transports no longer reach peers.
    let err = old[0].0.send(ack(0, 1, 0)).expect_err("epoch 1 is over");
    assert!(err.to_string().contains("worker 1"), "{err}");
    // An epoch does not go back.
    let err = planes[0]
        .start_epoch(0, 2, addrs(&planes), 3, Duration::from_millis(100))
        .await
        .expect_err("stale epoch");
    assert!(err.to_string().contains("does not follow"), "{err}");
    for ev in &mut events {
        assert!(ev.try_recv().is_err(), "no events in a healthy run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_without_a_hello_cannot_make_the_plane_buffer_much() {
    let id = JobIdentity::generate().expect("identity");
    let plane = plane(&id, "right", Arc::new(TestCodec));
    let target = plane.local_addr().expect("addr");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let _ = any;
    // A peer of the job (it holds the job certificate) that never says hello.
    let stranger = data_plane_endpoint(local_socket(), &id).expect("client");
    let conn = within("connect", async {
        stranger.connect(target, SERVER_NAME).expect("connecting").await
    })
    .await
    .expect("the TLS handshake needs no token");
    // The first stream is where the plane waits for the hello; nothing is sent on it. The second
    // is never read: what QUIC buffers for it is bounded by the connection's window before the
    // token, so 8 MiB cannot be written (with the authenticated window, 128 MiB, it would be).
    let mut hello = conn.open_uni().await.expect("open");
    hello.write_all(&[]).await.expect("open the hello stream");
    let mut flood = conn.open_uni().await.expect("open");
    let written = tokio::time::timeout(Duration::from_secs(2), flood.write_all(&vec![0u8; 8 << 20])).await;
    assert!(written.is_err(), "8 MiB were accepted before any token");
    const { assert!(PRE_AUTH_WINDOW < 8 << 20) };
    conn.close(0u32.into(), b"done");
    stranger.close(0u32.into(), b"done");
    drop(plane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_job_certificate_is_refused_in_the_handshake() {
    let id = JobIdentity::generate().expect("identity");
    let plane = plane(&id, "right", Arc::new(TestCodec));
    let target = plane.local_addr().expect("addr");
    // It trusts the job's certificate, but has none to show (as the coordinator's clients).
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let stranger = endpoint(any, &id, &id.fingerprint()).expect("client");
    let attempt = within("connect", async {
        stranger.connect(target, SERVER_NAME).expect("connecting").await
    })
    .await;
    // In TLS 1.3 the client may finish its side before the server has checked its certificate:
    // then the server closes the connection at once, with the handshake's alert.
    let err = match attempt {
        Err(e) => e,
        Ok(conn) => within("the refusal", conn.closed()).await,
    };
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    stranger.close(0u32.into(), b"done");
    drop(plane);
}

both_paths!(a_wrong_token_is_refused_within_a_second);

async fn a_wrong_token_is_refused_within_a_second(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes = vec![
        plane_on(&id, "right", Arc::new(TestCodec), same_host),
        plane_on(&id, "wrong", Arc::new(TestCodec), same_host),
    ];
    let start = Instant::now();
    let results = start_all(&planes, 1, Duration::from_secs(5)).await;
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    for (w, r) in results.into_iter().enumerate() {
        let err = r.expect_err("refused");
        assert!(err.to_string().contains("wrong token"), "worker {w}: {err}");
    }
}

/// A process that took a peer's same-host socket name first (a container of another job running
/// as the same user on the host's network) is given the challenge only: the opener checks its
/// answer, finds no proof of the token and reaches the peer over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_on_a_peers_socket_name_learns_no_token_and_the_link_uses_quic() {
    let id = JobIdentity::generate().expect("identity");
    let token = "the-job-secret";
    let (real, opener) = (
        plane_on(&id, token, Arc::new(TestCodec), false),
        plane_on(&id, token, Arc::new(TestCodec), true),
    );
    let tag = crate::net::quic::sha256_hex(token.as_bytes())[..16].to_string();
    let port = real.local_addr().expect("addr").port();
    let listener = super::local::listen(&super::local::socket_name(&tag, port)).expect("the impostor listens");
    let spy = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("the opener connects");
        let (mut read, mut write) = stream.into_split();
        let mut got = vec![0u8; super::local::CHALLENGE_LEN];
        read.read_exact(&mut got).await.expect("the challenge");
        write
            .write_all(&[0u8; super::local::ANSWER_LEN])
            .await
            .expect("an answer without proof");
        let mut rest = Vec::new();
        let _ = read.read_to_end(&mut rest).await;
        got.extend(rest);
        got
    });
    let planes = vec![real, opener];
    let results = start_all(&planes, 1, Duration::from_secs(10)).await;
    for (w, r) in results.into_iter().enumerate() {
        assert!(r.is_ok(), "worker {w}: {:?}", r.err());
    }
    assert_paths(&planes, false);
    let got = within("the impostor's bytes", spy).await.expect("spy");
    assert_eq!(
        got.len(),
        super::local::CHALLENGE_LEN,
        "the impostor got the challenge only"
    );
    assert!(!got.windows(token.len()).any(|w| w == token.as_bytes()));
}

both_paths!(an_undecodable_frame_evicts_its_sender);

async fn an_undecodable_frame_evicts_its_sender(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes = vec![
        plane_on(&id, "secret", Arc::new(TestCodec), same_host),
        plane_on(&id, "secret", Arc::new(GarbageCodec), same_host),
    ];
    let mut events0 = planes[0].events().expect("events");
    let mut events1 = planes[1].events().expect("events");
    let mut nets: Vec<_> = start_all(&planes, 5, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 5"))
        .collect();
    nets[1].0.send(ack(1, 0, 0)).expect("send");
    match within("the eviction", events0.recv()).await.expect("event") {
        PeerEvent::Evicted { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (5, 1));
            assert!(detail.contains("does not decode"), "{detail}");
        }
        other => panic!("expected an eviction, got {other:?}"),
    }
    let err = nets[0].0.send(ack(0, 1, 0)).expect_err("evicted");
    assert!(
        err.to_string().contains("worker 1") && err.to_string().contains("evicted"),
        "{err}"
    );
    assert!(nets[0].1.try_recv().is_err(), "the bad frame was not delivered");
    // The evicted worker learns why.
    match within("the loss", events1.recv()).await.expect("event") {
        PeerEvent::Lost { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (5, 0));
            assert!(detail.contains("protocol violation"), "{detail}");
        }
        other => panic!("expected a loss, got {other:?}"),
    }
}

both_paths!(a_frame_over_the_codecs_bound_evicts_its_sender);

/// The frame bound is the receiving codec's (the model's, for the runtime's codec), not a fixed
/// one: an acknowledgement of 32 bytes passes a bound of 100, a tensor of 64 floats does not.
async fn a_frame_over_the_codecs_bound_evicts_its_sender(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes = vec![
        plane_on(&id, "secret", Arc::new(BoundedCodec(100)), same_host),
        plane_on(&id, "secret", Arc::new(TestCodec), same_host),
    ];
    let mut events0 = planes[0].events().expect("events");
    let mut nets: Vec<_> = start_all(&planes, 4, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 4"))
        .collect();
    nets[1].0.send(ack(1, 0, 7)).expect("send");
    let got = within("the acknowledgement", nets[0].1.recv()).await.expect("a packet");
    assert_eq!(got.id, 7);
    let tensor = Packet {
        from: 1,
        to: 0,
        id: 8,
        payload: Payload::Tensors(vec![(0, vec![1.5f32; 64])]),
    };
    nets[1].0.send(tensor).expect("send");
    match within("the eviction", events0.recv()).await.expect("event") {
        PeerEvent::Evicted { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (4, 1));
            assert!(
                detail.contains("of 292 bytes is over the limit of 104 bytes"),
                "{detail}"
            );
        }
        other => panic!("expected an eviction, got {other:?}"),
    }
    assert!(nets[0].1.try_recv().is_err(), "the long frame was never delivered");
}

both_paths!(a_damaged_frame_is_refused_by_its_checksum_and_evicts_its_sender);

/// A tensor packet with a flipped byte would decode (as another float): only the checksum tells.
async fn a_damaged_frame_is_refused_by_its_checksum_and_evicts_its_sender(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes = vec![
        plane_on(&id, "secret", Arc::new(TestCodec), same_host),
        plane_on(&id, "secret", Arc::new(TestCodec), same_host),
    ];
    let mut events0 = planes[0].events().expect("events");
    let mut nets: Vec<_> = start_all(&planes, 3, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 3"))
        .collect();
    let tensor = |id: u64| Packet {
        from: 1,
        to: 0,
        id,
        payload: Payload::Tensors(vec![(0, vec![1.5f32; 64])]),
    };
    // An intact packet first: it arrives.
    nets[1].0.send(tensor(1)).expect("send");
    let got = within("the intact packet", nets[0].1.recv()).await.expect("a packet");
    assert_eq!(got.id, 1);
    nets[1]
        .0
        .send_damaged(tensor(2))
        .expect("bytes travel")
        .expect("queued");
    match within("the eviction", events0.recv()).await.expect("event") {
        PeerEvent::Evicted { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (3, 1));
            assert!(detail.contains("CRC-32") && detail.contains("damaged"), "{detail}");
        }
        other => panic!("expected an eviction, got {other:?}"),
    }
    assert!(nets[0].1.try_recv().is_err(), "the damaged packet was never delivered");
}

/// Two planes in epoch 2 that exchanged a packet; worker 1 lives on its own runtime, which the test
/// drops to stop it dead (no close is sent), as if its process were killed.
async fn pair_with_a_victim(
    same_host: bool,
) -> (
    tokio::runtime::Runtime,
    Vec<Arc<DataPlane>>,
    tokio::sync::mpsc::UnboundedReceiver<PeerEvent>,
    Vec<(QuicTransport, Inbox)>,
) {
    let id = JobIdentity::generate().expect("identity");
    let victim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let victim = {
        let _guard = victim_rt.enter();
        plane_on(&id, "secret", Arc::new(TestCodec), same_host)
    };
    let planes = vec![plane_on(&id, "secret", Arc::new(TestCodec), same_host), victim];
    let events = planes[0].events().expect("events");
    let mut nets: Vec<_> = start_all(&planes, 2, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 2"))
        .collect();
    nets[0].0.send(ack(0, 1, 0)).expect("send");
    assert_eq!(within("a packet", nets[1].1.recv()).await.expect("packet").id, 0);
    (victim_rt, planes, events, nets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_lost_within_two_seconds() {
    let (victim_rt, planes, mut events, nets) = pair_with_a_victim(false).await;

    let killed = Instant::now();
    victim_rt.shutdown_background();
    let event = tokio::time::timeout(Duration::from_millis(2500), events.recv())
        .await
        .expect("the loss within 2.5 s")
        .expect("event");
    let waited = killed.elapsed();
    match event {
        PeerEvent::Lost { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (2, 1));
            assert!(detail.contains("timed out"), "{detail}");
        }
        other => panic!("expected a loss, got {other:?}"),
    }
    assert!(waited >= Duration::from_millis(1000), "lost after {waited:?}");
    let err = nets[0].0.send(ack(0, 1, 1)).expect_err("lost");
    assert!(err.to_string().contains("worker 1"), "{err}");
    // The victim's plane cannot be dropped cleanly without its runtime; leak it (a killed process).
    let mut planes = planes;
    if let Some(victim) = planes.pop() {
        std::mem::forget(victim);
    }
    std::mem::forget(nets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_peer_fails_the_epoch_naming_it() {
    let id = JobIdentity::generate().expect("identity");
    let planes: Vec<_> = (0..2).map(|_| plane(&id, "secret", Arc::new(TestCodec))).collect();
    // Worker 1 never starts epoch 1: worker 0 connects (its hello waits as pending) but never hears
    // worker 1's hello.
    let err = within(
        "start_epoch",
        planes[0].start_epoch(0, 1, addrs(&planes), 2, Duration::from_millis(300)),
    )
    .await
    .expect_err("no hello from worker 1");
    assert!(err.to_string().contains("worker 1 did not answer the hello"), "{err}");

    // A peer that does not answer at all (a UDP socket nobody reads): the connection times out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut peers = addrs(&planes[..1]);
    peers.push((2, silent.local_addr().expect("addr")));
    let err = within(
        "start_epoch",
        planes[0].start_epoch(0, 2, peers, 3, Duration::from_millis(300)),
    )
    .await
    .expect_err("no answer from worker 2");
    assert!(
        err.to_string().contains("worker 2 did not answer the connection"),
        "{err}"
    );
}

#[test]
fn hello_round_trip() {
    let hello = plane_hello();
    let bytes = hello.encode();
    assert_eq!(super::plane::Hello::decode(&bytes).expect("decode"), hello);
    assert!(super::plane::Hello::decode(&bytes[..bytes.len() - 1]).is_err());
    assert!(super::plane::Hello::decode(b"GET / HTTP/1.1\r\n\r\n--------").is_err());
}

fn plane_hello() -> super::plane::Hello {
    super::plane::Hello {
        token: "t0k3n".to_string(),
        epoch: 9,
        from: 4,
    }
}

both_paths!(a_peer_that_shuts_down_is_lost_at_once);

async fn a_peer_that_shuts_down_is_lost_at_once(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let mut planes: Vec<_> = (0..3)
        .map(|_| plane_on(&id, "secret", Arc::new(TestCodec), same_host))
        .collect();
    let mut events = planes[0].events().expect("events");
    let nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    let start = Instant::now();
    let gone = planes.pop().expect("worker 2");
    drop(gone);
    match within("the loss", events.recv()).await.expect("event") {
        PeerEvent::Lost { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (1, 2));
            assert!(detail.contains("shut down"), "{detail}");
        }
        other => panic!("expected a loss, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    let err = nets[0].0.send(ack(0, 2, 0)).expect_err("worker 2 is gone");
    assert!(err.to_string().contains("worker 2"), "{err}");
    nets[0].0.send(ack(0, 1, 0)).expect("worker 1 is still there");
    // Exactly one event for worker 2, none for worker 1.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(events.try_recv().is_err(), "one event per lost peer");

    let ep = endpoint("127.0.0.1:0".parse().expect("addr"), &id, &id.fingerprint()).expect("endpoint");
    let err = DataPlane::new(ep, String::new(), Arc::new(TestCodec))
        .err()
        .expect("an empty token");
    assert!(err.to_string().contains("token"), "{err}");
}

both_paths!(frames_of_tens_of_mib_arrive_whole_and_in_order);

async fn frames_of_tens_of_mib_arrive_whole_and_in_order(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let planes: Vec<_> = (0..2)
        .map(|_| plane_on(&id, "secret", Arc::new(TestCodec), same_host))
        .collect();
    let mut nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    let floats = 6 << 20; // 24 MiB a frame
    for id in 0..3u64 {
        let data: Vec<f32> = (0..floats).map(|i| (i as u64 * 3 + id) as f32).collect();
        nets[0]
            .0
            .send(Packet {
                from: 0,
                to: 1,
                id,
                payload: Payload::Tensors(vec![(0, data)]),
            })
            .expect("send");
        nets[0].0.send(ack(0, 1, 100 + id)).expect("send");
    }
    for id in 0..3u64 {
        let p = within("a big packet", nets[1].1.recv()).await.expect("packet");
        assert_eq!(p.id, id);
        let Payload::Tensors(t) = p.payload else {
            panic!("expected tensors")
        };
        assert_eq!(t[0].1.len(), floats);
        assert!(t[0].1.iter().enumerate().all(|(i, &x)| x == (i as u64 * 3 + id) as f32));
        let p = within("an ack", nets[1].1.recv()).await.expect("packet");
        assert_eq!(p.id, 100 + id);
    }
}

/// A worker whose actors stopped (a setup replaces them) has no inbox while its links live on:
/// frames to it are dropped, and its peers do not report it lost (its reader used to drop the
/// stream, which stopped the peer's sending: "lost"). Over QUIC only: on the same-host path the
/// old reader left the peer's writes blocked, which nothing outside the plane can observe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_inbox_is_gone_is_not_reported_lost() {
    let id = JobIdentity::generate().expect("identity");
    let planes: Vec<_> = (0..2)
        .map(|_| plane_on(&id, "secret", Arc::new(TestCodec), false))
        .collect();
    let mut events0 = planes[0].events().expect("events");
    let mut nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    let (transport1, inbox1) = nets.pop().expect("worker 1");
    drop(inbox1);
    // Two bursts: the first reaches worker 1's reader, the second is written after the reader
    // could have stopped the stream.
    for id in 0..200u64 {
        let data: Vec<f32> = vec![id as f32; 16 << 10]; // 64 KiB a frame
        let packet = Packet {
            from: 0,
            to: 1,
            id,
            payload: Payload::Tensors(vec![(0, data)]),
        };
        nets[0].0.send(packet).expect("send");
        if id == 99 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let quiet = tokio::time::timeout(Duration::from_millis(2500), events0.recv()).await;
    assert!(quiet.is_err(), "an event about a live worker: {quiet:?}");
    nets[0].0.send(ack(0, 1, 1000)).expect("the link is still up");
    drop(transport1);
}

both_paths!(nothing_is_reported_about_an_epoch_that_is_over);

async fn nothing_is_reported_about_an_epoch_that_is_over(same_host: bool) {
    let id = JobIdentity::generate().expect("identity");
    let mut planes: Vec<_> = (0..2)
        .map(|_| plane_on(&id, "secret", Arc::new(TestCodec), same_host))
        .collect();
    let mut events0 = planes[0].events().expect("events");
    let mut events1 = planes[1].events().expect("events");
    let nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    // Worker 0 moves on alone: worker 1 sees its epoch-1 connections end, which is not a loss, but
    // it can no longer send to worker 0 in epoch 1.
    let me = addrs(&planes[..1]);
    let (solo, mut solo_inbox) = within("epoch 2", planes[0].start_epoch(0, 2, me, 1, WAIT))
        .await
        .expect("epoch 2");
    solo.send(ack(0, 0, 7)).expect("self-send");
    assert_eq!(within("a packet", solo_inbox.recv()).await.expect("packet").id, 7);
    let sent = within("worker 1 notices", async {
        loop {
            if let Err(e) = nets[1].0.send(ack(1, 0, 0)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Either the close (epoch over) or the stopped stream just before it is what the sender sees.
    let sent = sent.to_string();
    assert!(
        sent.contains("left the epoch") || sent.contains("gone from epoch 1"),
        "{sent}"
    );
    // Worker 1 shutting down is not news to worker 0 either: it is not in epoch 2.
    drop(planes.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(events0.try_recv().is_err(), "no events of epoch 1 once epoch 2 started");
    assert!(events1.try_recv().is_err(), "a peer leaving the epoch is not a loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_same_host_path_is_reached_over_quic() {
    let id = JobIdentity::generate().expect("identity");
    let planes = vec![
        plane_on(&id, "secret", Arc::new(TestCodec), true),
        plane_on(&id, "secret", Arc::new(TestCodec), false),
        plane_on(&id, "secret", Arc::new(TestCodec), true),
    ];
    let mut nets: Vec<_> = start_all(&planes, 1, WAIT)
        .await
        .into_iter()
        .map(|r| r.expect("epoch 1"))
        .collect();
    exchange(&mut nets, 20).await;
    use LinkPath::{Quic, SameHost};
    assert_eq!(planes[0].link_paths(), vec![(1, Quic), (2, SameHost)]);
    assert_eq!(planes[1].link_paths(), vec![(0, Quic), (2, Quic)]);
    assert_eq!(planes[2].link_paths(), vec![(0, SameHost), (1, Quic)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_same_host_peer_is_lost_at_once() {
    // As in `a_silent_peer_is_lost_within_two_seconds`, but the kernel closes a dead process's
    // sockets: no idle timeout to wait for.
    let (victim_rt, planes, mut events, nets) = pair_with_a_victim(true).await;
    assert_paths(&planes, true);

    let killed = Instant::now();
    victim_rt.shutdown_background();
    let event = within("the loss", events.recv()).await.expect("event");
    let waited = killed.elapsed();
    match event {
        PeerEvent::Lost { epoch, peer, detail } => {
            assert_eq!((epoch, peer), (2, 1));
            assert!(detail.contains("gone") || detail.contains("failed"), "{detail}");
        }
        other => panic!("expected a loss, got {other:?}"),
    }
    assert!(waited < Duration::from_millis(500), "lost after {waited:?}");
    let err = nets[0].0.send(ack(0, 1, 1)).expect_err("lost");
    assert!(err.to_string().contains("worker 1"), "{err}");
    let mut planes = planes;
    if let Some(victim) = planes.pop() {
        std::mem::forget(victim);
    }
    std::mem::forget(nets);
}

/// Connect to `plane`'s same-host socket as a stranger that knows `token` would: send a challenge,
/// check the answer, then send `first(proof)` (written raw: a length, then bytes; `proof` is the
/// opener's proof a right hello carries), and read how the plane ends the connection.
async fn local_attempt(plane: &DataPlane, token: &str, first: impl FnOnce(&str) -> Vec<u8>) -> super::local::Ending {
    let tag = sha256_hex(token.as_bytes())[..16].to_string();
    let port = plane.local_addr().expect("addr").port();
    let name = super::local::socket_name(&tag, port);
    let stream = super::local::connect(&name)
        .await
        .expect("connect")
        .expect("the plane listens");
    let (mut read, mut write, proof) = super::local::open_handshake(stream, token, &name, WAIT)
        .await
        .expect("the plane proves the token");
    write.write_all(&first(&proof)).await.expect("write");
    within("the close frame", super::local::read_ending(&mut read)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_same_host_hellos_are_refused_naming_why() {
    use super::local::Ending;
    let id = JobIdentity::generate().expect("identity");
    let p = plane_on(&id, "secret", Arc::new(TestCodec), true);
    let frame = |bytes: &[u8]| {
        let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    };
    let hello = |token: &str, epoch: u64, from: usize| {
        frame(
            &super::plane::Hello {
                token: token.to_string(),
                epoch,
                from,
            }
            .encode(),
        )
    };
    assert_eq!(
        local_attempt(&p, "secret", |_| hello("guess", 1, 0)).await,
        Ending::Closed(1, "wrong token".to_string())
    );
    // The token itself is no proof on this path (it never crosses a same-host socket).
    assert_eq!(
        local_attempt(&p, "secret", |_| hello("secret", 1, 0)).await,
        Ending::Closed(1, "wrong token".to_string())
    );
    match local_attempt(&p, "secret", |_| frame(b"GET / HTTP/1.1\r\n\r\n------------")).await {
        Ending::Closed(2, reason) => assert!(reason.contains("not a data-plane hello"), "{reason}"),
        other => panic!("expected a protocol close, got {other:?}"),
    }
    match local_attempt(&p, "secret", |_| (1u64 << 40).to_le_bytes().to_vec()).await {
        Ending::Closed(2, reason) => assert!(reason.contains("over the limit"), "{reason}"),
        other => panic!("expected a protocol close, got {other:?}"),
    }
    // Something other than a challenge first is refused before any answer.
    let tag = sha256_hex(b"secret")[..16].to_string();
    let port = p.local_addr().expect("addr").port();
    let stream = super::local::connect(&super::local::socket_name(&tag, port))
        .await
        .expect("connect")
        .expect("the plane listens");
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(&[b'x'; super::local::CHALLENGE_LEN])
        .await
        .expect("write");
    match within("the close frame", super::local::read_ending(&mut read)).await {
        Ending::Closed(2, reason) => assert!(reason.contains("not a same-host challenge"), "{reason}"),
        other => panic!("expected a protocol close, got {other:?}"),
    }
    // A right hello for an epoch the plane has not started waits; a stale one is refused.
    let peers = vec![(0, p.local_addr().expect("addr"))];
    let (_t, _inbox) = within("a solo epoch", p.start_epoch(0, 4, peers, 1, WAIT))
        .await
        .expect("epoch 4");
    assert_eq!(
        local_attempt(&p, "secret", |proof| hello(proof, 0, 1)).await,
        Ending::Closed(4, "stale epoch".to_string())
    );
}

/// The same-host path bounds its handshakes as the QUIC path does: beyond the handshakes running
/// and the queue waiting for one, a connection is closed at once (each held a socket and a task
/// for the hello's 10 s, without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_same_host_connections_is_bounded() {
    use tokio::io::AsyncReadExt;
    let id = JobIdentity::generate().expect("identity");
    let token = "the-job-secret";
    let plane = plane_on(&id, token, Arc::new(TestCodec), true);
    let tag = crate::net::quic::sha256_hex(token.as_bytes())[..16].to_string();
    let port = plane.local_addr().expect("addr").port();
    let name = super::local::socket_name(&tag, port);
    // A connect finds the listener's own queue full while the plane has not accepted yet: again.
    let dial = || async {
        for _ in 0..500 {
            if let Some(s) = super::local::connect(&name).await.expect("connect") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the listener's queue stayed full for 5 s");
    };
    let mut silent = Vec::new();
    for _ in 0..super::plane::HANDSHAKES + super::plane::HANDSHAKE_QUEUE {
        silent.push(dial().await);
    }
    // Every place taken (the plane accepts them in the background): one more is closed at once.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut one = dial().await;
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(500), one.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                // Still taken in: the plane had not yet accepted every earlier one.
                _ => silent.push(one),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "no connection was refused within 5 s");
    assert!(silent.len() < 2 * (super::plane::HANDSHAKES + super::plane::HANDSHAKE_QUEUE));
}
