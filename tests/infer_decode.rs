//! The key/value-cached decoder: its logits agree with the recomputing forward over the same window
//! (within 1e-5 relative), a sequence gets the same bits alone or in any batch, and the batch and
//! its cache refuse what does not fit.

use semoe::infer::{BatchDecoder, SampleOptions, SeqId};
use semoe::kernels::Cpu;
use semoe::model::gpt::{Gpt, GptConfig};
use std::collections::BTreeMap;

fn small(moe_every: usize) -> GptConfig {
    GptConfig {
        block_size: 16,
        d_model: 32,
        n_layer: 3,
        n_head: 4,
        d_ff: 48,
        experts: 4,
        k: 2,
        moe_every,
        ..GptConfig::default()
    }
}

/// Initialised weights scaled up, so that logits and routing are far from uniform (a trained
/// model's are too: the main job's checkpoints agree with the recomputing forward to about 6e-7).
fn scaled(config: &GptConfig, seed: u64, scale: f32) -> Gpt<f32> {
    let mut m = Gpt::init(config, seed).expect("init");
    for buf in m.buffers_mut() {
        buf.iter_mut().for_each(|v| *v *= scale);
    }
    m
}

fn model(config: &GptConfig, seed: u64) -> Gpt<f32> {
    scaled(config, seed, 4.0)
}

fn opts(tokens: usize, temperature: f64, top_k: usize, seed: u64) -> SampleOptions {
    SampleOptions {
        max_tokens: tokens,
        temperature,
        top_k,
        seed,
    }
}

/// Generate with the cached decoder, checking every step's logits against `Gpt::logits` over the
/// window the decoder reports; returns the number of window shifts seen.
fn check_against_recomputing(m: &Gpt<f32>, prompt: &[u8], tokens: usize) -> usize {
    let config = m.config();
    let reference = m.for_inference().expect("inference model");
    let cpu = Cpu::new(1).expect("cpu");
    let mut decoder = BatchDecoder::new(m, cpu.clone(), 1).expect("decoder");
    let id = decoder.admit(prompt, &opts(tokens, 1.0, 0, 9)).expect("admit");
    let (mut shifts, mut last_len, mut steps) = (0, 0, 0);
    while decoder.active() > 0 {
        // Read the logits before the step that would end the sequence removes it.
        let emitted = decoder.step().expect("step");
        assert_eq!(emitted.len(), 1);
        steps += 1;
        assert!(
            steps <= tokens,
            "the sequence of {tokens} tokens is still active after {steps} steps"
        );
        let Some((logits, window)) = decoder.last_logits(id) else {
            assert!(emitted[0].finished, "a live sequence has logits");
            break;
        };
        assert!(
            !window.is_empty() && window.len() <= config.block_size,
            "window of {}",
            window.len()
        );
        if window.len() < last_len {
            shifts += 1;
        }
        last_len = window.len();
        let want = reference.logits(&cpu, window, 1).expect("recompute");
        let want = &want[(window.len() - 1) * config.vocab..];
        assert_eq!(logits.len(), want.len(), "logit count");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 1e-3, "logits are not trivially small: {scale}");
        for (i, (&got, &w)) in logits.iter().zip(want).enumerate() {
            let err = (got - w).abs() / scale;
            assert!(err <= 1e-5, "step {steps}, byte {i}: {got} vs {w} (relative {err})");
        }
    }
    assert_eq!(steps, tokens);
    shifts
}

#[test]
fn cached_logits_agree_with_the_recomputing_forward() {
    // Dense and MoE blocks mixed, then every block MoE; 60 bytes cross several window shifts.
    for moe_every in [2, 1, 0] {
        let shifts = check_against_recomputing(&model(&small(moe_every), 3), b"To be, or", 60);
        assert!(shifts >= 5, "moe_every {moe_every}: {shifts} window shifts");
    }
    // A prompt longer than the context keeps its last block_size bytes.
    check_against_recomputing(&model(&small(1), 3), &[b'a'; 40], 10);
}

#[test]
fn the_main_jobs_model_agrees_with_the_recomputing_forward() {
    let shifts = check_against_recomputing(&scaled(&GptConfig::default(), 3, 2.0), b"ROMEO.\n", 120);
    assert!(shifts >= 2, "{shifts} window shifts");
}

/// Every step's bytes and logit bits of each sequence, decoded in one batch with the given
/// admission schedule: `(step, prompt index)`, on one compute thread.
fn run_batch(
    m: &Gpt<f32>,
    prompts: &[(Vec<u8>, SampleOptions)],
    schedule: &[(usize, usize)],
    max_batch: usize,
) -> BTreeMap<usize, (Vec<u8>, Vec<Vec<u32>>)> {
    run_batch_on(1, m, prompts, schedule, max_batch)
}

/// [`run_batch`] on `threads` compute threads.
fn run_batch_on(
    threads: usize,
    m: &Gpt<f32>,
    prompts: &[(Vec<u8>, SampleOptions)],
    schedule: &[(usize, usize)],
    max_batch: usize,
) -> BTreeMap<usize, (Vec<u8>, Vec<Vec<u32>>)> {
    let mut decoder = BatchDecoder::new(m, Cpu::new(threads).expect("cpu"), max_batch).expect("decoder");
    let mut ids: BTreeMap<SeqId, usize> = BTreeMap::new();
    let mut out: BTreeMap<usize, (Vec<u8>, Vec<Vec<u32>>)> = BTreeMap::new();
    let mut step = 0;
    let mut max_active = 0;
    loop {
        for &(at, p) in schedule {
            if at == step {
                let (prompt, o) = &prompts[p];
                ids.insert(decoder.admit(prompt, o).expect("admit"), p);
            }
        }
        max_active = max_active.max(decoder.active());
        if decoder.active() == 0 && schedule.iter().all(|&(at, _)| at < step) {
            break;
        }
        // Logits of each sequence, read before a finishing sequence leaves the batch: the step
        // returns the bytes, and `last_logits` of the survivors; finished ones are compared by bytes.
        for e in decoder.step().expect("step") {
            let p = ids[&e.id];
            let entry = out.entry(p).or_default();
            entry.0.push(e.byte);
            if let Some((logits, _)) = decoder.last_logits(e.id) {
                entry.1.push(logits.iter().map(|v| v.to_bits()).collect());
            }
        }
        step += 1;
        assert!(step < 10_000, "the batch never drained");
    }
    if prompts.len() > 1 && max_batch > 1 {
        assert!(max_active > 1, "the batch held {max_active} sequence(s) at once");
    }
    out
}

#[test]
fn a_sequence_gets_the_same_bits_alone_and_in_a_batch() {
    let config = small(1);
    let m = model(&config, 5);
    let prompts = vec![
        (b"ab".to_vec(), opts(30, 0.9, 10, 1)),
        (Vec::new(), opts(25, 1.0, 0, 2)),
        (vec![b'x'; 40], opts(20, 0.0, 0, 3)),
        (b"The quick brown".to_vec(), opts(35, 1.3, 40, 4)),
        (b"q".to_vec(), opts(1, 1.0, 0, 5)),
    ];
    let schedule = [(0, 0), (0, 1), (3, 2), (3, 3), (10, 4)];
    let together = run_batch(&m, &prompts, &schedule, 5);
    assert_eq!(together.len(), prompts.len());
    for (p, (prompt, o)) in prompts.iter().enumerate() {
        let alone = run_batch(&m, &[(prompt.clone(), o.clone())], &[(0, 0)], 1);
        let (bytes, logits) = &together[&p];
        assert_eq!(bytes.len(), o.max_tokens, "prompt {p}: bytes drawn");
        assert_eq!(bytes, &alone[&0].0, "prompt {p}: bytes");
        assert_eq!(logits.len(), alone[&0].1.len(), "prompt {p}: steps with logits");
        assert!(logits == &alone[&0].1, "prompt {p}: logit bits differ");
        // And through `generate`, one byte at a time.
        let generated =
            semoe::infer::generate(&m, &Cpu::new(1).expect("cpu"), prompt, o, |_| Ok(())).expect("generate");
        assert_eq!(&generated, bytes, "prompt {p}: generate");
    }
    // Two threads give the same bits, bytes and logits (rows are shared out, never split).
    let two = run_batch_on(2, &m, &prompts, &schedule, 5);
    assert_eq!(two.len(), together.len(), "sequences decoded with 2 threads");
    for (p, (bytes, logits)) in &together {
        assert_eq!(&two[p].0, bytes, "prompt {p} with 2 threads: bytes");
        assert_eq!(
            two[p].1.len(),
            logits.len(),
            "prompt {p} with 2 threads: steps with logits"
        );
        assert!(&two[p].1 == logits, "prompt {p} with 2 threads: logit bits differ");
    }
}

#[test]
fn the_batch_refuses_what_does_not_fit_and_frees_cancelled_slots() {
    let config = small(1);
    let m = model(&config, 7);
    let mut decoder = BatchDecoder::new(&m, Cpu::new(1).expect("cpu"), 2).expect("decoder");
    assert_eq!(
        decoder.cache_bytes(),
        2 * semoe::infer::decoder::KvCache::slot_bytes(&config),
        "the cache holds exactly max_batch sequences"
    );
    let a = decoder.admit(b"a", &opts(50, 1.0, 0, 1)).expect("admit a");
    let b = decoder.admit(b"b", &opts(50, 1.0, 0, 2)).expect("admit b");
    let full = decoder
        .admit(b"c", &opts(5, 1.0, 0, 3))
        .expect_err("a third sequence is refused");
    assert!(full.to_string().contains("full"), "{full}");
    assert_eq!(decoder.step().expect("step").len(), 2);
    assert!(decoder.cancel(a));
    assert!(!decoder.cancel(a), "cancelling twice");
    let c = decoder
        .admit(b"c", &opts(5, 1.0, 0, 3))
        .expect("the cancelled slot is free again");
    let emitted = decoder.step().expect("step");
    let ids: Vec<SeqId> = emitted.iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![b, c], "a cancelled sequence draws nothing");
    let zero = decoder.admit(b"d", &opts(0, 1.0, 0, 4)).expect_err("max_tokens 0");
    assert!(zero.to_string().contains("max_tokens"), "{zero}");
    let hot = decoder
        .admit(b"d", &opts(3, f64::NAN, 0, 4))
        .expect_err("NaN temperature");
    assert!(hot.to_string().contains("temperature"), "{hot}");
    assert!(
        BatchDecoder::new(&m, Cpu::new(1).expect("cpu"), 0).is_err(),
        "an empty batch"
    );
}

/// The model in memory, failing once at its `fail_at`-th piece.
struct FailOnce {
    inner: semoe::infer::weights::ResidentWeights,
    calls: usize,
    fail_at: usize,
}

impl semoe::infer::weights::WeightSource for FailOnce {
    fn config(&self) -> &GptConfig {
        self.inner.config()
    }
    fn embeddings(&self) -> (&[f32], &[f32]) {
        self.inner.embeddings()
    }
    fn with_piece<R>(
        &mut self,
        piece: semoe::infer::weights::Piece,
        f: impl FnOnce(semoe::infer::weights::PieceWeights<'_>) -> semoe::Result<R>,
    ) -> semoe::Result<R> {
        self.calls += 1;
        if self.calls == self.fail_at {
            return Err(semoe::Error::runtime("injected: a piece that cannot be read"));
        }
        self.inner.with_piece(piece, f)
    }
}

#[test]
fn a_failed_step_leaves_every_sequence_as_it_was() {
    let config = small(1);
    let m = model(&config, 13);
    let prompts = [
        (b"hello".to_vec(), opts(20, 1.0, 0, 1)),
        (b"w".to_vec(), opts(20, 0.8, 10, 2)),
    ];
    let undisturbed = run_batch(&m, &prompts, &[(0, 0), (0, 1)], 2);
    // Fail in the first pass (prompt encoding), then in a later one (incremental decoding).
    for fail_at in [3, 40] {
        let source = FailOnce {
            inner: semoe::infer::weights::ResidentWeights::new(m.clone()),
            calls: 0,
            fail_at,
        };
        let mut decoder = BatchDecoder::with_source(source, Cpu::new(1).expect("cpu"), 2).expect("decoder");
        let ids: Vec<SeqId> = prompts
            .iter()
            .map(|(p, o)| decoder.admit(p, o).expect("admit"))
            .collect();
        let mut got: BTreeMap<SeqId, Vec<u8>> = BTreeMap::new();
        let (mut failures, mut steps) = (0, 0);
        while decoder.active() > 0 {
            match decoder.step() {
                Ok(emitted) => emitted.iter().for_each(|e| got.entry(e.id).or_default().push(e.byte)),
                Err(e) => {
                    assert!(e.to_string().contains("injected"), "{e}");
                    failures += 1;
                }
            }
            steps += 1;
            assert!(steps < 100, "never drained");
        }
        assert_eq!(failures, 1, "fail_at {fail_at}: one failed step");
        for (p, id) in ids.iter().enumerate() {
            assert_eq!(
                got[id], undisturbed[&p].0,
                "fail_at {fail_at}, prompt {p}: the bytes of an undisturbed run"
            );
        }
    }
}

#[test]
fn a_prompt_outside_the_vocabulary_is_refused_at_admission() {
    let config = GptConfig { vocab: 128, ..small(1) };
    let m = model(&config, 2);
    let mut decoder = BatchDecoder::new(&m, Cpu::new(1).expect("cpu"), 1).expect("decoder");
    let e = decoder
        .admit(&[b'a', 200], &opts(3, 1.0, 0, 1))
        .expect_err("byte 200 of 128");
    assert!(
        e.to_string().contains("byte 1 is 200") && e.to_string().contains("128"),
        "{e}"
    );
    assert_eq!(decoder.active(), 0);
    // An empty prompt starts from a newline (byte 10): not in a vocabulary of 8.
    let tiny = model(&GptConfig { vocab: 8, ..small(1) }, 2);
    let mut small_vocab = BatchDecoder::new(&tiny, Cpu::new(1).expect("cpu"), 1).expect("decoder");
    let e = small_vocab
        .admit(b"", &opts(3, 1.0, 0, 1))
        .expect_err("an empty prompt of a vocabulary of 8");
    assert!(
        e.to_string().contains("empty prompt") && e.to_string().contains("of 8"),
        "{e}"
    );
    small_vocab.admit(&[1, 7], &opts(3, 1.0, 0, 1)).expect("bytes below 8");
    decoder
        .admit(b"ok", &opts(3, 1.0, 0, 1))
        .expect("a prompt inside the vocabulary");
}

#[test]
fn prompts_beyond_one_pass_are_encoded_over_several_with_the_same_bits() {
    let config = GptConfig {
        block_size: 128,
        ..small(1)
    };
    let m = model(&config, 17);
    let long = |c: u8| (0..120u8).map(|i| b'a' + (i.wrapping_mul(c)) % 26).collect::<Vec<u8>>();
    let prompts = vec![
        (long(3), opts(10, 1.0, 0, 1)),
        (long(5), opts(10, 1.0, 0, 2)),
        (long(7), opts(10, 1.0, 0, 3)),
    ];
    assert!(
        prompts.iter().map(|(p, _)| p.len()).sum::<usize>() > semoe::infer::batch::MAX_ROWS,
        "the prompts need more than one pass"
    );
    let together = run_batch(&m, &prompts, &[(0, 0), (0, 1), (0, 2)], 3);
    for (p, (prompt, o)) in prompts.iter().enumerate() {
        let alone = run_batch(&m, &[(prompt.clone(), o.clone())], &[(0, 0)], 1);
        assert!(together[&p] == alone[&0], "prompt {p}: bytes and logit bits");
    }
}

/// A batch larger than the machine's memory is refused with the cache's size (its allocation
/// aborted the process): `Server::bind` and `BatchDecoder::new` size their cache with it.
#[test]
fn a_key_value_cache_larger_than_the_machine_is_refused() {
    let config = small(1);
    let err = semoe::infer::decoder::KvCache::new(&config, 1 << 40)
        .err()
        .expect("a cache of 2^40 sequences")
        .to_string();
    assert!(
        err.contains("a key/value cache of 1099511627776 sequences needs") && err.contains("of memory and swap"),
        "{err}"
    );
}

#[test]
fn a_model_whose_output_is_not_finite_is_refused_not_sampled() {
    // A dense model (no gate to meet the NaN first) whose output layer holds one NaN: every
    // logit of that byte is NaN. Sampling picked the same byte from NaN weights every step.
    let config = small(0);
    let mut m = model(&config, 3);
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _, _)| n).collect();
    let head = names.iter().position(|n| n == "lm_head").expect("lm_head tensor");
    m.buffers_mut()[head][5] = f32::NAN;
    let mut decoder = BatchDecoder::new(&m, Cpu::new(1).expect("cpu"), 1).expect("decoder");
    decoder.admit(b"hi", &opts(4, 0.0, 0, 1)).expect("admit");
    let e = decoder.step().expect_err("NaN logits").to_string();
    assert!(e.contains("the output layer") && e.contains("non-finite"), "{e}");
}

/// Each sequence's bytes, and the sequences that failed with why.
type Decoded = (BTreeMap<SeqId, Vec<u8>>, Vec<(SeqId, String)>);

/// Every byte of each sequence, stepping with [`BatchDecoder::step_isolating`]; the failures seen.
fn decode_isolating(decoder: &mut BatchDecoder, ids: &[SeqId]) -> Decoded {
    let mut bytes: BTreeMap<SeqId, Vec<u8>> = ids.iter().map(|&id| (id, Vec::new())).collect();
    let mut failed = Vec::new();
    for _ in 0..100 {
        if decoder.active() == 0 {
            return (bytes, failed);
        }
        let outcome = decoder.step_isolating(&mut || {}).expect("step");
        for e in outcome.emitted {
            bytes.get_mut(&e.id).expect("a known sequence").push(e.byte);
        }
        failed.extend(outcome.failed.into_iter().map(|(id, e)| (id, e.to_string())));
    }
    panic!("the batch did not end in 100 steps");
}

#[test]
fn a_sequence_whose_own_values_are_not_finite_fails_alone() {
    // An embedding row of NaN for the byte 'Z' (a checkpoint damaged where one rare byte is): the
    // prompt holding it meets the NaN at the first gate, and it alone. `step` fails the whole
    // batch; `step_isolating` steps each sequence alone and fails only that one.
    let config = small(1);
    let mut m = model(&config, 5);
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _, _)| n).collect();
    let wte = names.iter().position(|n| n == "wte").expect("wte tensor");
    let d = config.d_model;
    m.buffers_mut()[wte][usize::from(b'Z') * d..][..d].fill(f32::NAN);
    let cpu = Cpu::new(1).expect("cpu");
    let prompts: [&[u8]; 3] = [b"ab", b"aZ", b"cd"];

    let mut whole = BatchDecoder::new(&m, cpu.clone(), 3).expect("decoder");
    for p in prompts {
        whole.admit(p, &opts(6, 1.0, 0, 3)).expect("admit");
    }
    let e = whole.step().expect_err("the batch meets the NaN").to_string();
    assert!(e.contains("the gate of block 0"), "{e}");

    let mut decoder = BatchDecoder::new(&m, cpu.clone(), 3).expect("decoder");
    let ids: Vec<SeqId> = prompts
        .iter()
        .map(|p| decoder.admit(p, &opts(6, 1.0, 0, 3)).expect("admit"))
        .collect();
    let mut retries = 0;
    let first = decoder.step_isolating(&mut || retries += 1).expect("step");
    assert_eq!(retries, 3, "one pass per sequence after the batch failed");
    assert_eq!(first.emitted.len(), 2);
    let (mut bytes, mut failed) = decode_isolating(&mut decoder, &ids);
    for e in first.emitted {
        bytes.get_mut(&e.id).expect("a known sequence").insert(0, e.byte);
    }
    failed.extend(first.failed.into_iter().map(|(id, e)| (id, e.to_string())));
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, ids[1]);
    assert!(failed[0].1.contains("the gate of block 0"), "{}", failed[0].1);
    assert!(bytes[&ids[1]].is_empty(), "the failed sequence drew nothing");
    // The others drew every byte, the same as alone.
    for (i, p) in prompts.iter().enumerate().filter(|&(i, _)| i != 1) {
        let mut alone = BatchDecoder::new(&m, cpu.clone(), 1).expect("decoder");
        let id = alone.admit(p, &opts(6, 1.0, 0, 3)).expect("admit");
        let (expected, none) = decode_isolating(&mut alone, &[id]);
        assert!(none.is_empty());
        assert_eq!(expected[&id].len(), 6);
        assert_eq!(bytes[&ids[i]], expected[&id], "sequence {i}");
    }
    // The failed sequence's slot is free again: the batch admits three sequences.
    for p in [b"xy", b"yz", b"zx"] {
        decoder.admit(p, &opts(1, 1.0, 0, 3)).expect("a free slot");
    }

    // When every sequence fails, every one is reported and the batch is empty.
    let mut doomed = BatchDecoder::new(&m, cpu, 2).expect("decoder");
    let ids: Vec<SeqId> = [b"Za", b"bZ"]
        .iter()
        .map(|p| doomed.admit(*p, &opts(3, 1.0, 0, 3)).expect("admit"))
        .collect();
    let (bytes, failed) = decode_isolating(&mut doomed, &ids);
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), ids);
    assert!(bytes.values().all(Vec::is_empty));
    assert_eq!(doomed.active(), 0);
}
