//! Fuzz of the wire codec: random bytes and mutations of valid frames (bit flips, truncations,
//! forged length fields, trailing bytes) must be refused or decoded, never panic or allocate what a
//! forged length asks for.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use semoe::model::gpt::Gpt;
use semoe::net::wire::{decode_frame, decode_packet, decode_state, encode_packet, encode_state, Limits, PacketShape};
use semoe::net::{Packet, Payload, Segment, StepId};
use semoe::train::optimizer;
use std::sync::Arc;
use std::time::Instant;

const EPOCH: u64 = 3;

fn floats(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Valid packets of every kind, small enough to mutate many times a second.
fn valid_packets(shape: &PacketShape, rng: &mut ChaCha8Rng) -> Vec<Packet> {
    let d = shape.d_model;
    let step = StepId { step: 12, attempt: 1 };
    let mut seg = |group: usize, expert: usize, rows: usize| Segment {
        group,
        expert,
        rows,
        data: floats(rng, rows * d),
    };
    let segments = vec![seg(0, 1, 2), seg(1, 3, 1), seg(3, 0, 0)];
    let back = vec![seg(2, 2, 3)];
    let reply = vec![seg(0, 0, 1), seg(0, 2, 1)];
    // The small tensors: layer norms and biases.
    let small: Vec<usize> = (0..shape.tensor_lens.len())
        .filter(|&i| shape.tensor_lens[i] <= 3 * d)
        .take(4)
        .collect();
    let tensors = |idx: &[usize]| -> Vec<(usize, Vec<f32>)> {
        idx.iter()
            .map(|&i| (i, (0..shape.tensor_lens[i]).map(|j| j as f32 * 0.5).collect()))
            .collect()
    };
    let grads = tensors(&small[..2]);
    let answer = tensors(&small[1..]);
    let params = tensors(&small[2..])
        .into_iter()
        .map(|(i, v)| (i, Arc::new(v)))
        .collect();
    let payloads = vec![
        Payload::ExpertForward {
            step,
            block: 1,
            segments,
        },
        Payload::ExpertBackward {
            step,
            block: 0,
            segments: back,
        },
        Payload::DenseGrads {
            step,
            group: 2,
            tensors: grads,
        },
        Payload::Params { step, tensors: params },
        Payload::Gather {
            step,
            tensors: vec![4, 0, 7],
        },
        Payload::Segments(reply),
        Payload::Tensors(answer),
        Payload::Ack,
        Payload::Failed {
            restartable: true,
            detail: "expert 0.1 on worker 1 failed".into(),
        },
    ];
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Packet {
            from: i % shape.workers,
            to: (i + 1) % shape.workers,
            id: 1000 + i as u64,
            payload,
        })
        .collect()
}

/// A length worth writing over a length field: the edges, powers of two and near misses.
fn forged_length(rng: &mut ChaCha8Rng, old: u64) -> u64 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << rng.random_range(0..64),
        3 => old.wrapping_add(rng.random_range(1..4)),
        4 => old.wrapping_sub(rng.random_range(1..4)),
        5 => u32::MAX as u64,
        6 => rng.random_range(0..4096),
        _ => rng.random(),
    }
}

/// Mutate a valid frame: flips, truncation, forged length fields, extra bytes.
fn mutate(rng: &mut ChaCha8Rng, frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let head_len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    let count_at = 4 + head_len;
    let count = u32::from_le_bytes([
        frame[count_at],
        frame[count_at + 1],
        frame[count_at + 2],
        frame[count_at + 3],
    ]) as usize;
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..5) {
                let at = rng.random_range(0..out.len());
                out[at] ^= rng.random_range(1..=255u8);
            }
        }
        1 => {
            // Flip inside the header only: the bincode part.
            if head_len > 0 {
                let at = 4 + rng.random_range(0..head_len);
                out[at] = rng.random();
            }
        }
        2 => out.truncate(rng.random_range(0..frame.len())),
        3 => {
            let field = rng.random_range(0..2 + count);
            if field == 0 {
                let v = forged_length(rng, head_len as u64) as u32;
                out[..4].copy_from_slice(&v.to_le_bytes());
            } else if field == 1 {
                let v = forged_length(rng, count as u64) as u32;
                out[count_at..count_at + 4].copy_from_slice(&v.to_le_bytes());
            } else {
                let at = count_at + 4 + 8 * (field - 2);
                let old = u64::from_le_bytes(out[at..at + 8].try_into().expect("8 bytes"));
                out[at..at + 8].copy_from_slice(&forged_length(rng, old).to_le_bytes());
            }
        }
        4 => {
            for _ in 0..rng.random_range(1..16) {
                out.push(rng.random());
            }
        }
        _ => {
            let at = rng.random_range(0..out.len());
            out.insert(at, rng.random());
        }
    }
    out
}

#[test]
fn random_and_mutated_frames_never_panic() {
    let config = common::small_config(1);
    let shape = PacketShape::of(&config, 4).expect("shape");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let packets = valid_packets(&shape, &mut rng);
    let frames: Vec<Vec<u8>> = packets
        .iter()
        .map(|p| encode_packet(EPOCH, p).expect("encode"))
        .collect();
    for f in &frames {
        decode_packet(f, EPOCH, &shape).expect("a valid frame decodes");
    }
    let start = Instant::now();
    const FRAMES: usize = 500_000;
    let (mut tried, mut accepted, mut refused) = (0usize, 0usize, 0usize);
    for i in 0..FRAMES {
        let bytes = match i % 4 {
            0 => {
                let len = rng.random_range(0..256);
                (0..len).map(|_| rng.random::<u8>()).collect()
            }
            1 => {
                // Random bytes behind a plausible header length.
                let mut b = rng.random_range(0u32..48).to_le_bytes().to_vec();
                b.extend((0..rng.random_range(0..128)).map(|_| rng.random::<u8>()));
                b
            }
            _ => {
                let frame = &frames[rng.random_range(0..frames.len())];
                mutate(&mut rng, frame)
            }
        };
        tried += 1;
        match decode_packet(&bytes, EPOCH, &shape) {
            Ok(packet) => {
                accepted += 1;
                // What was accepted fits the shape: it encodes and decodes again.
                let again = encode_packet(EPOCH, &packet).expect("re-encode");
                decode_packet(&again, EPOCH, &shape).expect("an accepted packet decodes again");
            }
            Err(e) => {
                refused += 1;
                assert!(e.to_string().starts_with("cannot parse packet: "), "{e}");
            }
        }
        // The generic frame decoder with tight limits, on the same bytes.
        let limits = Limits {
            header_bytes: 64,
            bodies: 8,
            floats: 1024,
        };
        let _ = decode_frame::<(u64, u64, u64)>(&bytes, "frame", &limits);
    }
    assert_eq!(tried, FRAMES);
    assert_eq!(accepted + refused, FRAMES);
    assert!(refused > FRAMES / 2, "{refused} of {FRAMES} refused");
    assert!(accepted > 0, "no mutation (a flip in a body) was accepted");
    eprintln!(
        "{tried} frames in {:.2?}: {accepted} accepted, {refused} refused",
        start.elapsed()
    );
}

#[test]
fn mutated_states_never_panic() {
    let config = common::small_config(1);
    let model = Gpt::<f32>::init(&config.model, 1).expect("model");
    let opt = optimizer::for_model(&config.optimizer, &model).expect("optimizer");
    let state = encode_state(&model, &opt).expect("encode");
    decode_state(&config, &state).expect("a valid state decodes");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    const STATES: usize = 300;
    let mut refused = 0;
    for _ in 0..STATES {
        let bytes = mutate(&mut rng, &state);
        if let Err(e) = decode_state(&config, &bytes) {
            refused += 1;
            assert!(e.to_string().contains("training state"), "{e}");
        }
    }
    assert!(refused > STATES / 3, "{refused} of {STATES} refused");
}
