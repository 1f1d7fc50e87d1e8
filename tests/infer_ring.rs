//! Ring-memory inference: generation with the weights streamed through a ring of sections is
//! bitwise identical to generation with the whole model in memory, for every prefetch policy,
//! budget and batch size; the Device budget is never exceeded; bad budgets and damaged checkpoints
//! are refused with a clear error, and a checkpoint file that breaks mid-run ends generation with an
//! error instead of a hang.

mod common;

use common::TempDir;
use semoe::infer::weights::WeightSource;
use semoe::infer::{
    BatchDecoder, Decode, ModelFile, Prefetch, RingLoad, RingOptions, RingWeights, SampleOptions, SeqId,
};
use semoe::kernels::Cpu;
use semoe::model::gpt::{Gpt, GptConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Large enough that a mapped ring maps some parts (an expert's matrices and the head: 64 KiB
/// each) and copies others (attention's matrices, layer norms, biases).
fn config(moe_every: usize) -> GptConfig {
    GptConfig {
        block_size: 16,
        d_model: 64,
        n_layer: 3,
        n_head: 4,
        d_ff: 256,
        experts: 8,
        k: 2,
        moe_every,
        ..GptConfig::default()
    }
}

fn model(config: &GptConfig) -> Gpt<f32> {
    let mut m = Gpt::init(config, 11).expect("init");
    for buf in m.buffers_mut() {
        buf.iter_mut().for_each(|v| *v *= 4.0);
    }
    m
}

fn save(dir: &Path, m: &Gpt<f32>) -> PathBuf {
    let train = semoe::train::config::TrainConfig {
        model: m.config().clone(),
        ..Default::default()
    };
    semoe::storage::state::save_model(dir, &train, 7, m).expect("save")
}

fn prompts() -> Vec<(Vec<u8>, SampleOptions)> {
    let o = |max_tokens, temperature, top_k, seed| SampleOptions {
        max_tokens,
        temperature,
        top_k,
        seed,
    };
    vec![
        (b"Now is the winter".to_vec(), o(40, 1.0, 0, 1)),
        (b"x".to_vec(), o(30, 0.7, 20, 2)),
        (Vec::new(), o(35, 1.2, 0, 3)),
        (b"of our discontent".to_vec(), o(25, 0.0, 0, 4)),
    ]
}

/// A routed ring with one I/O thread and no Host tier.
fn routed(device_budget: u64, load: RingLoad) -> RingOptions {
    RingOptions {
        device_budget,
        host_budget: 0,
        prefetch: Prefetch::Routed,
        io_threads: 1,
        load,
        batch: 1,
    }
}

/// Each prompt's bytes and per-step logit bits.
type Decoded = BTreeMap<usize, (Vec<u8>, Vec<Vec<u32>>)>;

/// Bytes and per-step logit bits of each prompt, `batch` at a time.
fn decode<S: WeightSource>(mut decoder: BatchDecoder<S>, batch: usize) -> (Decoded, BatchDecoder<S>) {
    let all = prompts();
    let mut out: Decoded = BTreeMap::new();
    for chunk in (0..all.len()).collect::<Vec<_>>().chunks(batch) {
        let mut ids: BTreeMap<SeqId, usize> = BTreeMap::new();
        for &p in chunk {
            ids.insert(decoder.admit(&all[p].0, &all[p].1).expect("admit"), p);
        }
        let mut steps = 0;
        while decoder.active() > 0 {
            for e in decoder.step().expect("step") {
                let entry = out.entry(ids[&e.id]).or_default();
                entry.0.push(e.byte);
                if let Some((logits, _)) = decoder.last_logits(e.id) {
                    entry.1.push(logits.iter().map(|v| v.to_bits()).collect());
                }
            }
            steps += 1;
            assert!(steps < 1000, "never drained");
        }
    }
    (out, decoder)
}

#[test]
fn ring_generation_is_bitwise_resident_generation() {
    let cpu = Cpu::new(1).expect("cpu");
    let mut checked = 0;
    for moe_every in [1, 2] {
        let c = config(moe_every);
        let m = model(&c);
        let dir = TempDir::new("ring-bitwise");
        let ckpt = save(dir.path(), &m);
        // The Device bytes that are not sections (embeddings; with routed prefetch also the
        // router copies), and a section's size: budgets of exactly 2, 3 and 5 sections.
        let geometry = |prefetch, load| {
            let probe = RingWeights::new(
                ModelFile::open(&ckpt).expect("open"),
                &RingOptions {
                    device_budget: u64::MAX / 4,
                    host_budget: 0,
                    prefetch,
                    io_threads: 1,
                    load,
                    batch: 1,
                },
            )
            .expect("probe ring");
            (probe.stats().section_bytes, probe.stats().resident_bytes)
        };
        for batch in [1, 4] {
            let (want, _) = decode(BatchDecoder::new(&m, cpu.clone(), batch).expect("resident"), batch);
            assert_eq!(want.len(), 4);
            for (prefetch, load) in [Prefetch::Routed, Prefetch::WholeBlock, Prefetch::OnDemand]
                .into_iter()
                .flat_map(|p| [(p, RingLoad::Map), (p, RingLoad::Copy)])
            {
                // Two sections (the least), three, and a few; the Host tier empty, then holding some pieces.
                let (section, resident) = geometry(prefetch, load);
                for (sections, host_budget) in [(2, 0), (3, 0), (5, 3 * section), (2, 1 << 30)] {
                    let budget = resident + sections as u64 * section;
                    let ring = RingWeights::new(
                        ModelFile::open(&ckpt).expect("open"),
                        &RingOptions {
                            device_budget: budget,
                            host_budget,
                            prefetch,
                            io_threads: 1 + sections % 2,
                            load,
                            batch,
                        },
                    )
                    .expect("ring");
                    let label = format!(
                        "moe_every {moe_every}, batch {batch}, {prefetch:?}, {load:?}, {sections} sections, host {host_budget}"
                    );
                    let (got, decoder) = decode(
                        BatchDecoder::with_source(ring, cpu.clone(), batch).expect("decoder"),
                        batch,
                    );
                    assert_eq!(got.len(), want.len(), "{label}: sequences");
                    for (p, (bytes, logits)) in &want {
                        assert_eq!(&got[p].0, bytes, "{label}: prompt {p} bytes");
                        assert_eq!(got[p].1.len(), logits.len(), "{label}: prompt {p} steps");
                        assert!(&got[p].1 == logits, "{label}: prompt {p} logit bits");
                    }
                    let s = decoder.source().stats();
                    assert_eq!(s.device_bytes, budget, "{label}: the budget, exactly");
                    assert_eq!(s.sections, sections, "{label}: sections");
                    assert!(s.peak_sections_in_use >= 1, "{label}: {s:?}");
                    assert!(s.passes > 0 && s.loads > 0, "{label}: {s:?}");
                    match load {
                        RingLoad::Map if host_budget == 0 => assert!(
                            s.bytes_mapped > 0 && s.bytes_mapped < s.bytes_read,
                            "{label}: parts mapped and parts copied: {s:?}"
                        ),
                        RingLoad::Map => {}
                        RingLoad::Copy | RingLoad::Auto => assert_eq!(s.bytes_mapped, 0, "{label}: {s:?}"),
                    }
                    if host_budget == 0 {
                        assert!(s.bytes_read > 0 && s.bytes_from_host == 0, "{label}: {s:?}");
                    } else {
                        assert!(s.bytes_from_host > 0 && s.host_bytes <= host_budget, "{label}: {s:?}");
                    }
                    // Routed, pieces stay in their sections after use while the room is not
                    // needed (and are read again from there); never otherwise.
                    match prefetch {
                        Prefetch::Routed if sections == 5 => assert!(s.kept_hits > 0, "{label}: {s:?}"),
                        Prefetch::Routed => {}
                        _ => assert_eq!(s.kept_hits + s.kept_evictions, 0, "{label}: {s:?}"),
                    }
                    match prefetch {
                        Prefetch::Routed => assert!(s.predicted_hits > 0, "{label}: {s:?}"),
                        _ => assert_eq!(s.predicted_hits + s.predicted_misses, 0, "{label}: {s:?}"),
                    }
                    if prefetch != Prefetch::OnDemand {
                        assert_eq!(s.unrequested, 0, "{label}: every piece was queued ahead: {s:?}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 2 * 3 * 2 * 4);
}

/// A model whose experts are pieces of more than 1 MiB (`MAP_FROM_PIECE_BYTES`).
fn large_pieces() -> GptConfig {
    GptConfig {
        d_model: 256,
        d_ff: 512,
        n_layer: 1,
        n_head: 4,
        experts: 2,
        ..config(1)
    }
}

#[test]
fn auto_loading_copies_for_large_batches_whatever_the_pieces() {
    let m = model(&large_pieces());
    let dir = TempDir::new("ring-auto-batch");
    let ckpt = save(dir.path(), &m);
    let copy_from = semoe::infer::ring::COPY_FROM_BATCH;
    for (batch, want) in [
        (1, RingLoad::Map),
        (copy_from - 1, RingLoad::Map),
        (copy_from, RingLoad::Copy),
    ] {
        let options = RingOptions {
            batch,
            ..routed(1 << 30, RingLoad::Auto)
        };
        let ring = RingWeights::new(ModelFile::open(&ckpt).expect("open"), &options).expect("ring");
        assert_eq!(ring.stats().load, want, "batches of {batch}");
    }
}

#[test]
fn auto_loading_maps_large_pieces_and_copies_small_ones() {
    for (c, want) in [(config(1), RingLoad::Copy), (large_pieces(), RingLoad::Map)] {
        let m = model(&c);
        let dir = TempDir::new("ring-auto");
        let ckpt = save(dir.path(), &m);
        let ring =
            RingWeights::new(ModelFile::open(&ckpt).expect("open"), &routed(1 << 30, RingLoad::Auto)).expect("ring");
        let largest = 4 * (c.d_model * c.d_ff * 2 + c.d_ff + c.d_model) as u64;
        assert_eq!(
            ring.stats().load,
            want,
            "an expert of {largest} bytes against {}",
            semoe::infer::ring::MAP_FROM_PIECE_BYTES
        );
        let (got, _) = decode(
            BatchDecoder::with_source(ring, Cpu::new(1).expect("cpu"), 2).expect("decoder"),
            2,
        );
        let (resident, _) = decode(
            BatchDecoder::new(&m, Cpu::new(1).expect("cpu"), 2).expect("resident"),
            2,
        );
        assert!(got == resident, "{want:?}: bitwise resident generation");
    }
}

#[test]
fn a_budget_below_two_sections_is_refused_naming_the_least() {
    let m = model(&config(1));
    let dir = TempDir::new("ring-budget");
    let ckpt = save(dir.path(), &m);
    let e = RingWeights::new(
        ModelFile::open(&ckpt).expect("open"),
        &routed(10_000, RingLoad::default()),
    )
    .err()
    .expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("fewer than two sections") && msg.contains("at least"),
        "{msg}"
    );
    // I/O threads: at least one, and a bound (an absurd count aborted on its allocation).
    for io_threads in [0, semoe::infer::ring::MAX_IO_THREADS + 1, usize::MAX] {
        let options = RingOptions {
            io_threads,
            ..routed(1 << 30, RingLoad::default())
        };
        let e = RingWeights::new(ModelFile::open(&ckpt).expect("open"), &options)
            .err()
            .expect("refused");
        let msg = e.to_string();
        assert!(msg.contains("(--io-threads) must be between 1 and 64"), "{msg}");
    }
}

#[test]
fn damaged_checkpoints_are_refused_and_a_file_breaking_mid_run_is_an_error() {
    let m = model(&config(1));
    let dir = TempDir::new("ring-damage");
    let ckpt = save(dir.path(), &m);
    let file = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("read");
    // A flipped byte: the digest names it.
    let mut flipped = bytes.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x40;
    std::fs::write(&file, &flipped).expect("write");
    let e = ModelFile::open(&ckpt).err().expect("corrupt file refused").to_string();
    assert!(e.contains("SHA-256"), "{e}");
    // The run directory falls back to nothing older: an error, not a panic.
    assert!(ModelFile::open(dir.path()).is_err());
    std::fs::write(&file, &bytes).expect("restore");
    assert!(
        ModelFile::open(dir.path()).is_ok(),
        "the run directory resolves to the intact checkpoint"
    );

    // Truncated after opening: the next load (or, mapped, the next read of a piece loaded before
    // the cut) fails and generation stops with that error, copied or mapped.
    for load in [RingLoad::Map, RingLoad::Copy] {
        std::fs::write(&file, &bytes).expect("restore");
        let ring = RingWeights::new(ModelFile::open(&ckpt).expect("open"), &routed(1 << 30, load)).expect("ring");
        let mut decoder = BatchDecoder::with_source(ring, Cpu::new(1).expect("cpu"), 1).expect("decoder");
        decoder
            .admit(
                b"abc",
                &SampleOptions {
                    max_tokens: 50,
                    ..SampleOptions::default()
                },
            )
            .expect("admit");
        decoder.step().expect("a step before the cut");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(bytes.len() as u64 / 2))
            .expect("truncate");
        let started = std::time::Instant::now();
        let mut failed = None;
        for _ in 0..50 {
            match decoder.step() {
                Ok(_) => continue,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let msg = failed.unwrap_or_else(|| panic!("{load:?}: generation fails once the file is cut"));
        assert!(
            msg.contains("ring-memory inference") && msg.contains("reading"),
            "{load:?}: {msg}"
        );
        // For good: a server reports itself failed, not failing for a while.
        let lasting = Decode::broken(&decoder).unwrap_or_else(|| panic!("{load:?}: the failure lasts"));
        assert!(lasting.contains("ring-memory inference"), "{load:?}: {lasting}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }
}

#[test]
fn a_pass_that_stops_partway_does_not_wedge_the_next() {
    use semoe::infer::weights::{Piece, PieceWeights};
    let c = config(1);
    let m = model(&c);
    let dir = TempDir::new("ring-aborted");
    let ckpt = save(dir.path(), &m);
    let options = |device_budget| routed(device_budget, RingLoad::Map);
    let probe = RingWeights::new(ModelFile::open(&ckpt).expect("open"), &options(u64::MAX / 4)).expect("probe");
    let (section, resident) = (probe.stats().section_bytes, probe.stats().resident_bytes);
    drop(probe);
    let mut ring =
        RingWeights::new(ModelFile::open(&ckpt).expect("open"), &options(resident + 2 * section)).expect("ring");
    assert_eq!(ring.stats().sections, 2);
    let ok = |_: PieceWeights<'_>| Ok(());
    // A pass as the decoder runs it, stopped in block 1 (say, a non-finite gate) before its routing,
    // with every expert of block 1 guessed.
    ring.begin_pass().expect("begin");
    ring.prefetch(0, &[0, 1]).expect("prefetch");
    ring.with_piece(Piece::Attention(0), ok).expect("attention 0");
    for e in ring.route(0, &[0, 1]).expect("route") {
        ring.with_piece(Piece::Expert(0, e), ok).expect("expert");
    }
    ring.prefetch(1, &[0, 1, 2, 3, 4, 5, 6, 7]).expect("prefetch");
    ring.with_piece(Piece::Attention(1), ok).expect("attention 1");
    std::thread::sleep(std::time::Duration::from_millis(100));
    // The next passes run to their end, at once.
    for pass in 0..2 {
        let started = std::time::Instant::now();
        ring.begin_pass().expect("begin");
        for l in 0..c.n_layer {
            ring.prefetch(l, &[2, 3]).expect("prefetch");
            ring.with_piece(Piece::Attention(l), ok).expect("attention");
            for e in ring.route(l, &[2, 5]).expect("route") {
                ring.with_piece(Piece::Expert(l, e), ok).expect("expert");
            }
        }
        ring.with_piece(Piece::Head, ok).expect("head");
        ring.end_pass().expect("end");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "pass {pass} took {:?}",
            started.elapsed()
        );
    }
    // And generation through it is still bitwise resident generation.
    let cpu = Cpu::new(1).expect("cpu");
    let (want, _) = decode(BatchDecoder::new(&m, cpu.clone(), 2).expect("resident"), 2);
    let (got, _) = decode(BatchDecoder::with_source(ring, cpu, 2).expect("decoder"), 2);
    assert!(got == want, "bytes and logits after an aborted pass");
}

/// Record the model file's new length and digest in the checkpoint's manifest, and `edit` its
/// `extra`.
fn rewrite_manifest(ckpt: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(ckpt.join("model.safetensors")).expect("model file");
    let path = ckpt.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    for f in manifest["files"].as_array_mut().expect("files") {
        if f["name"] == "model.safetensors" {
            f["bytes"] = bytes.len().into();
            f["sha256"] = digest.clone().into();
        }
    }
    edit(&mut manifest["extra"]);
    // Without its own digest it is read as a manifest written before there was one.
    manifest.as_object_mut().expect("an object").remove("manifest_sha256");
    std::fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write manifest");
}

#[test]
fn crafted_headers_and_configs_are_errors_not_panics() {
    let m = model(&config(1));
    let dir = TempDir::new("ring-crafted");
    let ckpt = save(dir.path(), &m);
    let file = ckpt.join("model.safetensors");
    let original = std::fs::read(&file).expect("read");
    // lm_head's data offsets reaching past the end of u64.
    let header_len = u64::from_le_bytes(original[..8].try_into().expect("8 bytes")) as usize;
    let header = String::from_utf8(original[8..8 + header_len].to_vec()).expect("utf-8 header");
    let key = "\"data_offsets\":[";
    let at = header.find("\"lm_head\"").expect("lm_head in the header");
    let offsets = header[at..].find(key).expect("offsets") + at + key.len();
    let close = header[offsets..].find(']').expect("]") + offsets;
    let begin: u64 = header[offsets..close]
        .split(',')
        .next()
        .expect("begin")
        .trim()
        .parse()
        .expect("number");
    let end = u64::MAX - 4;
    let crafted_header = format!("{}{begin},{end}{}", &header[..offsets], &header[close..]);
    let with_header = |new_header: &str| {
        // The data keeps its place relative to the header's end (offsets count from there).
        let mut crafted = (new_header.len() as u64).to_le_bytes().to_vec();
        crafted.extend_from_slice(new_header.as_bytes());
        crafted.extend_from_slice(&original[8 + header_len..]);
        std::fs::write(&file, &crafted).expect("write");
    };
    with_header(&crafted_header);
    rewrite_manifest(&ckpt, |_| {});
    let e = ModelFile::open(&ckpt).err().expect("refused").to_string();
    assert!(e.contains("lm_head") && e.contains("data"), "{e}");

    // A config whose sizes overflow.
    std::fs::write(&file, &original).expect("restore");
    rewrite_manifest(&ckpt, |extra| extra["config"]["model"]["d_model"] = (1u64 << 33).into());
    let e = ModelFile::open(&ckpt).err().expect("refused").to_string();
    assert!(e.contains("too large"), "{e}");
    let resident = |ckpt: &Path| {
        semoe::storage::checkpoint::load(ckpt)
            .and_then(semoe::storage::state::model_from)
            .expect_err("refused")
            .to_string()
    };
    let e = resident(&ckpt);
    assert!(e.contains("too large"), "resident: {e}");

    // Billions of layers (the manifest is not under the model file's digest): refused before
    // anything is allocated for them, by the ring's reader and by the resident loader.
    rewrite_manifest(&ckpt, |extra| {
        extra["config"]["model"]["d_model"] = 64.into();
        extra["config"]["model"]["n_layer"] = 4_000_000_000u64.into();
    });
    let e = ModelFile::open(&ckpt).err().expect("refused").to_string();
    assert!(e.contains("n_layer (4000000000)"), "{e}");
    let e = resident(&ckpt);
    assert!(e.contains("n_layer (4000000000)"), "resident: {e}");

    // One layer fewer than the file holds: both readers name the tensor left over (each used to
    // load a truncated model silently).
    rewrite_manifest(&ckpt, |extra| extra["config"]["model"]["n_layer"] = 2.into());
    let e = resident(&ckpt);
    assert!(e.contains("it holds tensor \"h.2."), "resident: {e}");
    let e = ModelFile::open(&ckpt).err().expect("refused").to_string();
    assert!(e.contains("it holds tensor \"h.2."), "ring: {e}");
    rewrite_manifest(&ckpt, |extra| extra["config"]["model"]["n_layer"] = 3.into());
    semoe::storage::checkpoint::load(&ckpt)
        .and_then(semoe::storage::state::model_from)
        .expect("the restored manifest loads");

    // lm_head stored transposed (the same elements, another layout): refused by both readers
    // (the ring's checked element counts only, and computed on the wrong layout).
    let lm_head = header.find("\"lm_head\"").expect("lm_head");
    let shape = header[lm_head..].find("[64,256]").expect("lm_head's shape") + lm_head;
    let transposed = format!("{}[256,64]{}", &header[..shape], &header[shape + "[64,256]".len()..]);
    with_header(&transposed);
    rewrite_manifest(&ckpt, |_| {});
    let e = ModelFile::open(&ckpt).err().expect("refused").to_string();
    assert!(
        e.contains("tensor lm_head has shape [256, 64], the model needs [64, 256]"),
        "{e}"
    );
    let e = resident(&ckpt);
    assert!(e.contains("lm_head"), "resident: {e}");
}
