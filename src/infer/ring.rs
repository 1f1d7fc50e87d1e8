//! Ring-memory inference (SE-MoE): generation from a model larger than the memory it may use.
//!
//! The Device budget is cut into a fixed number of equal *sections*, each large enough for the
//! largest [piece](super::weights::Piece) of the model. I/O threads load pieces into free sections
//! in the order the forward pass will read them, from the Host tier (pieces kept in memory under
//! the Host budget) or straight from the checkpoint file; the decoder computes on one section while
//! the next ones load, and gives each section back as soon as it is done with it, so the sections
//! go round like a ring. What is loaded ahead:
//!
//! - [`Prefetch::Routed`]: the dense pieces of the pass as far as the next MoE block, and that
//!   block's experts as soon as they can be guessed: before the block runs, the decoder applies the
//!   block's gate to the residual stream entering it plus each sequence's last attention update
//!   there (the router is known one block ahead) and the ring starts loading those experts; once
//!   the gate has really routed the batch, wrong guesses are dropped, missing experts are queued,
//!   and the decoder reads the loaded ones first.
//! - [`Prefetch::WholeBlock`]: every piece of every block, all experts included, in order (no
//!   dependence on routing; pays when a large batch routes to most experts).
//! - [`Prefetch::OnDemand`]: nothing ahead: each piece is loaded when the decoder asks for it (the
//!   baseline the ring is measured against).
//!
//! With routed prefetch, a piece the decoder is done with stays in its section while no load needs
//! the room, and a later pass that wants it reads it from there; a load takes the section of the
//! kept piece expected to be read again last (and only for a piece read before it): a dense piece
//! is read at its place in every pass, an expert only by the passes that route to it, as often as
//! its recent routing says.
//!
//! The decoder and the I/O threads share one lock; each side sleeps on a condition variable of its
//! own and is woken only when the other gives it something to do (a wake-up is an interrupt sent
//! to another core, costly in a virtual machine, and most state changes leave a loader idle).
//!
//! How a piece gets into a section ([`RingLoad`]): its pages are mapped from the file into the
//! section's address range and read in place (`infer::mapped`: on a CPU, a copy would move every
//! weight byte twice), or it is copied into the section's own buffer, as a device with memory of
//! its own needs; by default the first for large pieces, the second for small ones.
//!
//! Whatever is loaded and in whichever order, the decoder computes the same products on the same
//! weights: ring generation is bitwise identical to resident generation (`tests/infer_ring.rs`).
//! The sections are allocated (mapped: reserved) once, at start; nothing else grows with the
//! model's layers or experts but the resident embeddings (and, for [`Prefetch::Routed`], a copy of
//! each MoE block's LN2 and gate), which count against the Device budget too. A pass's activations
//! (at most 256 rows of the model's widths) are not in any budget.

use super::mapped::{MappedModel, SectionMap};
use super::model_file::ModelFile;
use super::weights::{
    all_pieces, piece_from_parts, piece_len, split_piece, Piece, PieceWeights, RouterWeights, WeightSource,
};
use crate::error::{Error, Result};
use crate::model::gpt::GptConfig;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the ring loads ahead of the decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefetch {
    /// Dense pieces ahead; experts by the predicted, then the real routing.
    Routed,
    /// Every piece ahead, all experts of every block.
    WholeBlock,
    /// Nothing ahead: each piece loads when asked for.
    OnDemand,
}

impl std::str::FromStr for Prefetch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "routed" => Ok(Prefetch::Routed),
            "whole-block" => Ok(Prefetch::WholeBlock),
            "on-demand" => Ok(Prefetch::OnDemand),
            other => Err(Error::config(format!(
                "prefetch must be routed, whole-block or on-demand, got {other:?}"
            ))),
        }
    }
}

/// How a piece gets into a section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RingLoad {
    /// [`RingLoad::Copy`] for batches of [`COPY_FROM_BATCH`] sequences or more; below,
    /// [`RingLoad::Map`] when the model's largest piece is at least [`MAP_FROM_PIECE_BYTES`], else
    /// [`RingLoad::Copy`] (what the ring chose is in [`RingStats::load`]).
    #[default]
    Auto,
    /// The checkpoint file is mapped; a piece is loaded by mapping its pages and read in place
    /// (`infer::mapped`): no copy, the section is the piece's pages. Pieces of the Host tier are
    /// read in place too.
    Map,
    /// A piece is read (`pread`) or copied from the Host tier into a section's own buffer, as a
    /// device with memory of its own would need it.
    Copy,
}

impl std::str::FromStr for RingLoad {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(RingLoad::Auto),
            "map" => Ok(RingLoad::Map),
            "copy" => Ok(RingLoad::Copy),
            other => Err(Error::config(format!(
                "ring loading must be auto, map or copy, got {other:?}"
            ))),
        }
    }
}

/// The smallest largest-piece size for which [`RingLoad::Auto`] maps. Mapping costs a fixed price
/// per piece (system calls, page-table entries, a flush of the other cores' address translations
/// at release), copying a price per byte: measured on the 2-core Ice Lake VM (BENCHMARKS.md,
/// session 20), mapping was 10-25% faster with pieces of 1.07 MiB (the bench's 64-expert model)
/// and 25-40% slower with pieces of 264 KiB (the main job's model under a 2 MiB budget).
pub const MAP_FROM_PIECE_BYTES: u64 = 1 << 20;

/// The smallest batch for which [`RingLoad::Auto`] copies whatever the pieces' size. A mapped piece
/// is read in place from 4 KiB page-cache pages, which costs the products more the more rows they
/// multiply, while a copy costs the same at any batch: on the 2-core Ice Lake VM (BENCHMARKS.md,
/// session 22, the 64-expert model, 1.07 MiB pieces) mapping led copying by 25 points of resident
/// speed at batch 1 and by 1 and 7 points at batch 4 (two runs), and trailed by 12 and 4 points at
/// batch 8 and by 10 at batch 16.
pub const COPY_FROM_BATCH: usize = 8;

/// How to build a ring.
#[derive(Clone, Debug)]
pub struct RingOptions {
    /// Bytes of the Device tier: the sections plus the resident embeddings (and router copies).
    pub device_budget: u64,
    /// Bytes of the Host tier: pieces kept in memory, copied into sections instead of read from disk.
    pub host_budget: u64,
    /// What is loaded ahead.
    pub prefetch: Prefetch,
    /// Threads loading pieces.
    pub io_threads: usize,
    /// How pieces get into sections.
    pub load: RingLoad,
    /// The most sequences decoded together (the decoder's batch): [`RingLoad::Auto`] chooses by it.
    pub batch: usize,
}

/// What a ring did (totals since it was built).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RingStats {
    /// How pieces got into sections.
    pub load: RingLoad,
    /// Sections in the ring.
    pub sections: usize,
    /// Bytes of one section.
    pub section_bytes: u64,
    /// Bytes always resident on the Device side (embeddings, router copies).
    pub resident_bytes: u64,
    /// Sections plus resident bytes: what the Device tier holds, at most the Device budget.
    pub device_bytes: u64,
    /// Bytes of the pieces kept in the Host tier.
    pub host_bytes: u64,
    /// Most sections holding or loading a piece at once.
    pub peak_sections_in_use: usize,
    /// Pieces loaded.
    pub loads: u64,
    /// Bytes read from the checkpoint file (mapped: of the pieces whose pages were mapped).
    pub bytes_read: u64,
    /// Bytes of pieces served from the Host tier (copied into a section; mapped: read in place).
    pub bytes_from_host: u64,
    /// Of `bytes_read`, the bytes mapped and read in place ([`RingLoad::Map`]; the rest of a mapped
    /// ring's reads are small parts, copied).
    pub bytes_mapped: u64,
    /// Seconds the I/O threads spent loading.
    pub load_seconds: f64,
    /// Seconds the decoder waited for a piece.
    pub stall_seconds: f64,
    /// Forward passes.
    pub passes: u64,
    /// Experts loaded on a guess that the routing then confirmed.
    pub predicted_hits: u64,
    /// Experts loaded (or queued) on a guess that the routing did not confirm.
    pub predicted_misses: u64,
    /// Pieces the decoder asked for that nobody had queued.
    pub unrequested: u64,
    /// Pieces the decoder loaded itself, rather than wait while the I/O threads loaded later ones.
    pub self_loads: u64,
    /// Pieces wanted again while still kept in a section from an earlier use: no load.
    pub kept_hits: u64,
    /// Kept pieces whose section a load took.
    pub kept_evictions: u64,
}

/// What a section holds.
enum Section {
    /// Copied loading: the section's own buffer, for the largest piece.
    Buffer(Box<[f32]>),
    /// Mapped loading: a reserved address range the piece's pages are mapped into (nothing for a
    /// piece of the Host tier, read where it is kept).
    Mapped(SectionMap),
}

struct State {
    /// Each section (taken out while a piece loads into it or the decoder reads it).
    sections: Vec<Option<Section>>,
    /// Sections given back whose piece an I/O thread unmaps before they are free again.
    unmapping: Vec<usize>,
    free: Vec<usize>,
    /// Pieces the decoder is done with (or a routing did not confirm), left in their sections
    /// while no load needs the room: wanted again, they are ready without a load.
    /// Keyed by the piece's place in the pass (ordered maps throughout: a few hundred pieces at
    /// most, looked up several times per piece the decoder reads; no hashing).
    kept: BTreeMap<(usize, Piece), usize>,
    /// Each piece's place in a forward pass, and the place of the piece the decoder read last: the
    /// kept piece to give up for a load is the one expected to be read again last. Empty when
    /// pieces are not kept (see `RingWeights::new`).
    pass_order: BTreeMap<Piece, usize>,
    position: usize,
    /// By place: how often each expert's block routed to it lately (an average over passes,
    /// decaying by [`HEAT_DECAY`] a pass, of 1 when routed to and 0 when not), the estimate of the
    /// chance that the next pass reads it. A dense piece is read by every pass.
    heat: Vec<f32>,
    queue: VecDeque<Piece>,
    /// Pieces being loaded: their section, and when the load began.
    loading: BTreeMap<Piece, (usize, Instant)>,
    ready: BTreeMap<Piece, usize>,
    /// Loading pieces to drop when they arrive (a guess the routing did not confirm).
    cancelled: BTreeSet<Piece>,
    /// Experts queued on a guess, by block, not yet confirmed or dropped.
    guessed: BTreeSet<Piece>,
    error: Option<String>,
    shutdown: bool,
    /// I/O threads asleep, waiting for work (woken only when there is some: in a VM every wake-up
    /// is an interrupt sent to the other core, and most state changes give a loader nothing to do).
    idle_loaders: usize,
    /// The decoder is asleep, waiting for a piece (woken only then).
    decoder_waiting: bool,
    stats: RingStats,
}

impl State {
    /// Every section free, nothing queued; pieces kept after use when `pass_order` (every piece of
    /// a forward pass in reading order) is given.
    fn new(sections: Vec<Section>, pass_order: Option<&[Piece]>, stats: RingStats) -> Self {
        let count = sections.len();
        State {
            sections: sections.into_iter().map(Some).collect(),
            unmapping: Vec::new(),
            free: (0..count).rev().collect(),
            kept: BTreeMap::new(),
            pass_order: pass_order
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, i))
                .collect(),
            position: 0,
            heat: vec![0.0; pass_order.map_or(0, |order| order.len())],
            queue: VecDeque::new(),
            loading: BTreeMap::new(),
            ready: BTreeMap::new(),
            cancelled: BTreeSet::new(),
            guessed: BTreeSet::new(),
            error: None,
            shutdown: false,
            idle_loaders: 0,
            decoder_waiting: false,
            stats,
        }
    }

    /// Whether an I/O thread has something to do: a section to unmap, or the next queued piece to
    /// load and room for it.
    fn loader_has_work(&self) -> bool {
        self.shutdown || !self.unmapping.is_empty() || self.queue.front().is_some_and(|&p| self.has_room_for(p))
    }

    fn known(&self, piece: Piece) -> bool {
        self.ready.contains_key(&piece) || self.loading.contains_key(&piece) || self.queue.contains(&piece)
    }

    /// `piece` is wanted (again): a load of it cancelled earlier now counts, a kept piece is ready
    /// again, and the answer is whether it is ready, loading or queued.
    fn want(&mut self, piece: Piece) -> bool {
        self.cancelled.remove(&piece);
        if let Some(section) = self.kept.remove(&(self.place(piece), piece)) {
            self.ready.insert(piece, section);
            self.stats.kept_hits += 1;
        }
        self.known(piece)
    }

    /// The decoder is done with `piece` in `section` (or no longer wants it): keep it there while
    /// the room is not needed, or give the section back.
    fn keep_section(&mut self, piece: Piece, section: usize) {
        if !self.pass_order.is_empty() {
            self.kept.insert((self.place(piece), piece), section);
        } else {
            self.free_section(section);
        }
    }

    /// How far ahead of the decoder's place the forward pass reads `piece` (0: the piece it reads
    /// now; the one it read just before is the furthest).
    fn distance(&self, piece: Piece) -> usize {
        self.places_ahead(self.place(piece))
    }

    /// How far ahead of the decoder's place `place` is in the pass ([`State::distance`]).
    fn places_ahead(&self, place: usize) -> usize {
        let n = self.pass_order.len().max(1);
        (place + n - self.position % n) % n
    }

    /// `piece`'s place in a forward pass.
    fn place(&self, piece: Piece) -> usize {
        self.pass_order.get(&piece).copied().unwrap_or(0)
    }

    /// How many places ahead the decoder is expected to read `piece` (at `place`) next: a dense
    /// piece at its place in the pass ([`State::distance`]); an expert there in the passes that
    /// route to it, so `1 / heat - 1` passes later on average.
    fn next_use(&self, place: usize, piece: Piece) -> usize {
        let distance = self.places_ahead(place);
        if !matches!(piece, Piece::Expert(..)) {
            return distance;
        }
        let n = self.pass_order.len().max(1) as f32;
        let chance = self.heat.get(place).copied().unwrap_or(0.0).clamp(MIN_HEAT, 1.0);
        distance + (n * (1.0 - chance) / chance) as usize
    }

    /// The kept piece expected to be read again last, the first to give up its section, and its
    /// expected distance ([`State::next_use`]).
    fn victim(&self) -> Option<(Piece, usize)> {
        self.kept
            .keys()
            .map(|&(place, piece)| (piece, self.next_use(place, piece)))
            .max_by_key(|&(_, next)| next)
    }

    /// MoE block `block` routed this pass to the experts for which `used` holds (of `experts`).
    fn note_routing(&mut self, block: usize, experts: usize, used: impl Fn(usize) -> bool) {
        for e in 0..experts {
            let place = self.place(Piece::Expert(block, e));
            if let Some(heat) = self.heat.get_mut(place) {
                *heat = *heat * HEAT_DECAY + if used(e) { 1.0 - HEAT_DECAY } else { 0.0 };
            }
        }
    }

    /// A section to load `piece` into: a free one, else that of the kept piece expected to be read
    /// again last, if `piece` is read before it (keeping the pieces read again soonest is what the
    /// optimal policy does, with the expected next read standing in for the known one; a load for a
    /// piece read later than every kept one waits until a section is free).
    fn take_section(&mut self, piece: Piece) -> Option<usize> {
        if let Some(section) = self.free.pop() {
            return Some(section);
        }
        let (victim, d) = self.victim()?;
        if self.distance(piece) >= d {
            return None;
        }
        self.stats.kept_evictions += 1;
        self.kept.remove(&(self.place(victim), victim))
    }

    /// Whether a load of `piece` could start now (a section free, or held by a kept piece expected
    /// to be read later than it).
    fn has_room_for(&self, piece: Piece) -> bool {
        !self.free.is_empty() || self.victim().is_some_and(|(_, d)| self.distance(piece) < d)
    }

    /// Give `section` back. A mapped piece is unmapped first, so that the pages the process holds
    /// never exceed the sections in use, and by an I/O thread: unmapping flushes the other cores'
    /// address translations and waits for them, which the decoder should not wait for.
    fn free_section(&mut self, section: usize) {
        if let Some(Some(Section::Mapped(map))) = self.sections.get(section) {
            if map.holds_pages() {
                self.unmapping.push(section);
                return;
            }
        }
        self.free.push(section);
    }

    fn in_use(&self) -> usize {
        self.sections.len() - self.free.len()
    }

    /// Take the next queued piece and a free section for it (an I/O thread's next load).
    fn start_load(&mut self) -> Option<(Piece, usize, Section)> {
        let piece = *self.queue.front()?;
        self.start_load_of(piece)
    }

    /// Take `piece` out of the queue with a free section for it, if it is queued and a section is
    /// free.
    fn start_load_of(&mut self, piece: Piece) -> Option<(Piece, usize, Section)> {
        if !self.has_room_for(piece) {
            return None;
        }
        let i = self.queue.iter().position(|&p| p == piece)?;
        self.queue.remove(i);
        let section = self.take_section(piece)?;
        let Some(buf) = self.sections[section].take() else {
            self.error = Some(format!("ring section {section} was lost"));
            return None;
        };
        self.loading.insert(piece, (section, Instant::now()));
        let in_use = self.in_use();
        self.stats.peak_sections_in_use = self.stats.peak_sections_in_use.max(in_use);
        Some((piece, section, buf))
    }

    /// Whether the decoder may read a piece itself: not while a load has run longer than
    /// [`SUSPECT_LOAD`] (the disk may not answer, and a read that never returns would hang the
    /// decoder, which otherwise gives up after [`LOAD_DEADLINE`]).
    fn may_load_itself(&self) -> bool {
        !self.loading.values().any(|(_, since)| since.elapsed() > SUSPECT_LOAD)
    }

    /// A load of `piece` into `section` ended with `result` after `seconds`: the piece is ready,
    /// kept (or its section free again) if it was cancelled meanwhile, and its section free again
    /// if the load failed.
    fn finish_load(&mut self, piece: Piece, section: usize, buf: Section, result: Result<Loaded>, seconds: f64) {
        self.sections[section] = Some(buf);
        self.loading.remove(&piece);
        self.stats.load_seconds += seconds;
        match result {
            Ok(loaded) => {
                self.stats.loads += 1;
                self.stats.bytes_read += loaded.from_file;
                self.stats.bytes_from_host += loaded.from_host;
                self.stats.bytes_mapped += loaded.mapped;
                if self.cancelled.remove(&piece) {
                    self.keep_section(piece, section);
                } else {
                    self.ready.insert(piece, section);
                }
            }
            Err(e) => {
                self.free_section(section);
                self.error = Some(format!("loading {piece:?}: {e}"));
            }
        }
    }
}

/// The bytes one load moved.
struct Loaded {
    /// Read from the checkpoint file (mapped or copied).
    from_file: u64,
    /// Served from the Host tier.
    from_host: u64,
    /// Of `from_file`, mapped and read in place.
    mapped: u64,
}

impl Loaded {
    fn from_host(kept: &[f32]) -> Self {
        Loaded {
            from_file: 0,
            from_host: 4 * kept.len() as u64,
            mapped: 0,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Where the I/O threads wait for work.
    work: Condvar,
    /// Where the decoder waits for a piece.
    arrived: Condvar,
    file: ModelFile,
    /// Where the pieces lie in the file, when the ring maps it.
    mapping: Option<MappedModel>,
    host: BTreeMap<Piece, Box<[f32]>>,
    config: GptConfig,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::runtime("the ring's state was poisoned by a panic"))
    }

    /// Wake an idle I/O thread if `st` gives it something to do (call after changing the state).
    fn wake_loader(&self, st: &State) {
        if st.idle_loaders > 0 && st.loader_has_work() {
            self.work.notify_one();
        }
    }

    /// Wake the decoder if it waits for a piece (call after changing the state).
    fn wake_decoder(&self, st: &State) {
        if st.decoder_waiting {
            self.arrived.notify_one();
        }
    }

    /// Load `piece` into `section`.
    fn fill(&self, piece: Piece, section: &mut Section) -> Result<Loaded> {
        let buf = match section {
            Section::Buffer(buf) => buf,
            Section::Mapped(map) => {
                // A piece of the Host tier is read where it is kept.
                if let Some(kept) = self.host.get(&piece) {
                    map.release()?;
                    return Ok(Loaded::from_host(kept));
                }
                let mapping = self
                    .mapping
                    .as_ref()
                    .ok_or_else(|| Error::runtime("a mapped section in a ring that does not map its file"))?;
                let (from_file, mapped) = mapping.load(&self.file, piece, map)?;
                return Ok(Loaded {
                    from_file,
                    from_host: 0,
                    mapped,
                });
            }
        };
        match self.host.get(&piece) {
            Some(kept) => {
                buf[..kept.len()].copy_from_slice(kept);
                Ok(Loaded::from_host(kept))
            }
            None => Ok(Loaded {
                from_file: self.file.read_piece(piece, buf)?,
                from_host: 0,
                mapped: 0,
            }),
        }
    }
}

/// How much of an expert's heat (its recent share of passes that routed to it) is left after a
/// pass: about the last ten passes count.
const HEAT_DECAY: f32 = 0.9;

/// The least heat counted: an expert never routed to is expected back after 1/MIN_HEAT passes.
const MIN_HEAT: f32 = 1e-3;

/// The most I/O threads a ring starts (more only contend for the same disk and cores).
pub const MAX_IO_THREADS: usize = 64;

/// How long the decoder waits for a piece with no load finishing meanwhile before calling the ring
/// stuck.
pub(crate) const LOAD_DEADLINE: Duration = Duration::from_secs(120);

/// A load running this long makes the disk suspect: the decoder then waits for its piece (bounded
/// by [`LOAD_DEADLINE`]) rather than reading it itself, a read that might never return. Far above
/// a working disk's time for a piece (a slow disk or network mount still reads megabytes a
/// second), so that the decoder keeps reading alongside the I/O threads there.
const SUSPECT_LOAD: Duration = Duration::from_secs(10);

fn loader(shared: Arc<Shared>) {
    loop {
        let (piece, section, mut buf) = {
            let Ok(mut st) = shared.lock() else { return };
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(section) = st.unmapping.pop() {
                    let mut taken = st.sections[section].take();
                    drop(st);
                    let released = match &mut taken {
                        Some(Section::Mapped(map)) => map.release(),
                        _ => Ok(()),
                    };
                    st = match shared.lock() {
                        Ok(st) => st,
                        Err(_) => return,
                    };
                    st.sections[section] = taken;
                    match released {
                        Ok(()) => st.free.push(section),
                        Err(e) => st.error = Some(e.to_string()),
                    }
                    shared.wake_decoder(&st);
                    continue;
                }
                if st.queue.front().is_some_and(|&p| st.has_room_for(p)) {
                    break;
                }
                st.idle_loaders += 1;
                let woken = shared.work.wait(st);
                st = match woken {
                    Ok(st) => st,
                    Err(_) => return,
                };
                st.idle_loaders -= 1;
            }
            match st.start_load() {
                Some(next) => {
                    // More work than this thread takes: pass it on.
                    shared.wake_loader(&st);
                    next
                }
                // Checked just above that a piece and a section wait: only a lost section
                // (reported in the state's error) gets here.
                None => {
                    shared.arrived.notify_all();
                    return;
                }
            }
        };
        let started = Instant::now();
        let result = shared.fill(piece, &mut buf);
        let seconds = started.elapsed().as_secs_f64();
        let Ok(mut st) = shared.lock() else { return };
        st.finish_load(piece, section, buf, result, seconds);
        shared.wake_decoder(&st);
        shared.wake_loader(&st);
    }
}

/// A resident copy of an MoE block's LN2 scale and shift and gate, for predicting its routing.
type RouterCopy = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The model's weights streamed through a ring of sections (see the module documentation).
pub struct RingWeights {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    wte: Vec<f32>,
    wpe: Vec<f32>,
    routers: BTreeMap<usize, RouterCopy>,
    prefetch: Prefetch,
    section_len: usize,
    /// A pass has begun and not ended (one that stops partway is cleaned up by the next).
    in_pass: bool,
}

impl RingWeights {
    /// A ring over the checkpoint `file` under `options`' budgets. Refused, naming the smallest
    /// Device budget that would do, when fewer than two sections fit.
    pub fn new(file: ModelFile, options: &RingOptions) -> Result<Self> {
        let config = GptConfig {
            dropless: true,
            ..file.config().clone()
        };
        let pieces = all_pieces(&config);
        // Copied, a section is a buffer for the largest piece; mapped, it is the budget for the
        // largest piece's pages and has no buffer.
        let largest_piece = pieces.iter().map(|&p| piece_len(&config, p)).max().unwrap_or(0);
        let load = match options.load {
            RingLoad::Auto if options.batch >= COPY_FROM_BATCH => RingLoad::Copy,
            // Reading in place needs the kernel to report read errors as errors.
            RingLoad::Auto if !super::mapped::populate_read_supported() => RingLoad::Copy,
            RingLoad::Auto if 4 * largest_piece as u64 >= MAP_FROM_PIECE_BYTES => RingLoad::Map,
            RingLoad::Auto => RingLoad::Copy,
            chosen => chosen,
        };
        let (section_len, section_bytes, mapping) = match load {
            RingLoad::Copy | RingLoad::Auto => (largest_piece, 4 * largest_piece as u64, None),
            RingLoad::Map => {
                let mapping = MappedModel::new(&file, &config)?;
                let mut largest = 0;
                for &p in &pieces {
                    largest = largest.max(mapping.footprint(p)?);
                }
                (0, largest, Some(mapping))
            }
        };
        let wte = file.tensor("wte")?;
        let wpe = file.tensor("wpe")?;
        let mut routers = BTreeMap::new();
        if options.prefetch == Prefetch::Routed {
            for l in (0..config.n_layer).filter(|&l| config.is_moe(l)) {
                let n = |s: &str| format!("h.{l}.{s}");
                routers.insert(
                    l,
                    (
                        file.tensor(&n("ln2.weight"))?,
                        file.tensor(&n("ln2.bias"))?,
                        file.tensor(&n("moe.wg"))?,
                    ),
                );
            }
        }
        let resident_bytes = 4
            * (wte.len()
                + wpe.len()
                + routers
                    .values()
                    .map(|(a, b, c)| a.len() + b.len() + c.len())
                    .sum::<usize>()) as u64;
        let available = options.device_budget.saturating_sub(resident_bytes);
        let sections = ((available / section_bytes.max(1)) as usize).min(pieces.len().max(2));
        if sections < 2 {
            return Err(Error::config(format!(
                "a device budget of {} holds fewer than two sections of {} bytes (the largest piece of the \
                 model) next to {} resident bytes: give at least {} bytes",
                options.device_budget,
                section_bytes,
                resident_bytes,
                resident_bytes + 2 * section_bytes
            )));
        }
        if options.io_threads == 0 || options.io_threads > MAX_IO_THREADS {
            return Err(Error::config(format!(
                "the ring's I/O threads (--io-threads) must be between 1 and {MAX_IO_THREADS}, got {}",
                options.io_threads
            )));
        }
        // The Host tier keeps what every pass reads first (attention, dense blocks, head), then
        // experts in order, as far as its budget goes: for a pass that reads the pieces in a
        // fixed cycle, keeping a fixed set beats any recency-based eviction.
        let mut host = BTreeMap::new();
        let mut host_bytes = 0u64;
        let mut by_priority: Vec<Piece> = pieces
            .iter()
            .copied()
            .filter(|p| !matches!(p, Piece::Expert(..)))
            .collect();
        by_priority.extend(pieces.iter().copied().filter(|p| matches!(p, Piece::Expert(..))));
        for piece in by_priority {
            let len = piece_len(&config, piece);
            if host_bytes + 4 * len as u64 > options.host_budget {
                continue;
            }
            let mut buf = vec![0.0f32; len].into_boxed_slice();
            file.read_piece(piece, &mut buf)?;
            host_bytes += 4 * len as u64;
            host.insert(piece, buf);
        }
        let buffers = (0..sections)
            .map(|_| match &mapping {
                Some(m) => m.section().map(Section::Mapped),
                None => Ok(Section::Buffer(vec![0.0f32; section_len].into_boxed_slice())),
            })
            .collect::<Result<Vec<_>>>()?;
        // Pieces are kept after use with routed prefetch only. Loading on demand is the baseline
        // without a ring (nothing ahead, nothing kept); whole-block prefetch claims every piece of
        // the pass as soon as it is queued, which would turn every kept piece ready at once and
        // leave no room to load into.
        let keep = (options.prefetch == Prefetch::Routed).then_some(pieces.as_slice());
        let state = State::new(
            buffers,
            keep,
            RingStats {
                load,
                sections,
                section_bytes,
                resident_bytes,
                device_bytes: sections as u64 * section_bytes + resident_bytes,
                host_bytes,
                ..RingStats::default()
            },
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            work: Condvar::new(),
            arrived: Condvar::new(),
            file,
            mapping,
            host,
            config,
        });
        let mut ring = RingWeights {
            shared,
            threads: Vec::with_capacity(options.io_threads),
            wte,
            wpe,
            routers,
            prefetch: options.prefetch,
            section_len,
            in_pass: false,
        };
        // Started into the ring: when one cannot start, dropping the ring stops those that did.
        for i in 0..options.io_threads {
            let s = ring.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("semoe-ring-io-{i}"))
                .spawn(move || loader(s))
                .map_err(|e| Error::runtime(format!("cannot start a ring I/O thread: {e}")))?;
            ring.threads.push(handle);
        }
        ring.queue_static_from(0)?;
        Ok(ring)
    }

    /// What the ring has done so far.
    pub fn stats(&self) -> RingStats {
        match self.shared.lock() {
            Ok(st) => st.stats.clone(),
            Err(_) => RingStats::default(),
        }
    }

    /// The checkpoint file the ring reads.
    pub fn file(&self) -> &ModelFile {
        &self.shared.file
    }

    /// Queue the pieces that follow block `from`'s start without depending on a routing: dense
    /// pieces up to and including the next MoE block's attention (all of the pass, experts
    /// included, for [`Prefetch::WholeBlock`]); the head at the end.
    fn queue_static_from(&self, from: usize) -> Result<()> {
        if self.prefetch == Prefetch::OnDemand {
            return Ok(());
        }
        let c = &self.shared.config;
        let mut next = Vec::new();
        let mut l = from;
        loop {
            if l == c.n_layer {
                next.push(Piece::Head);
                break;
            }
            next.push(Piece::Attention(l));
            if c.is_moe(l) {
                if self.prefetch != Prefetch::WholeBlock {
                    break;
                }
                next.extend((0..c.experts).map(|e| Piece::Expert(l, e)));
            } else {
                next.push(Piece::Dense(l));
            }
            l += 1;
        }
        let mut st = self.shared.lock()?;
        for piece in next {
            if !st.want(piece) {
                st.queue.push_back(piece);
            }
        }
        self.shared.wake_loader(&st);
        Ok(())
    }
}

impl Drop for RingWeights {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.lock() {
            st.shutdown = true;
        }
        self.shared.work.notify_all();
        self.shared.arrived.notify_all();
        let threads = std::mem::take(&mut self.threads);
        // A thread still in a read after the wait (a disk or mount that does not answer) is left
        // to end on its own.
        crate::storage::tiers::threads::join_within(threads, crate::storage::tiers::threads::DROP_WAIT, "ring I/O");
    }
}

impl WeightSource for RingWeights {
    fn failure(&self) -> Option<String> {
        let file = &self.shared.file;
        match (self.shared.lock(), file.changed_size()) {
            (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
            (Ok(st), _) if st.error.is_some() => st.error.as_ref().map(|e| format!("ring-memory inference: {e}")),
            (Ok(_), Ok(true)) => Some(format!(
                "ring-memory inference: {} changed size after it was opened",
                file.path().display()
            )),
            (Ok(_), Ok(false)) => None,
        }
    }

    fn config(&self) -> &GptConfig {
        &self.shared.config
    }

    fn embeddings(&self) -> (&[f32], &[f32]) {
        (&self.wte, &self.wpe)
    }

    fn router_ahead(&self, block: usize) -> Option<RouterWeights<'_>> {
        self.routers
            .get(&block)
            .map(|(ln2_w, ln2_b, wg)| RouterWeights { ln2_w, ln2_b, wg })
    }

    fn prefetch(&mut self, block: usize, experts: &[usize]) -> Result<()> {
        if self.prefetch != Prefetch::Routed {
            return Ok(());
        }
        let mut st = self.shared.lock()?;
        for &e in experts {
            let piece = Piece::Expert(block, e);
            if !st.want(piece) {
                st.queue.push_back(piece);
                st.guessed.insert(piece);
            }
        }
        self.shared.wake_loader(&st);
        Ok(())
    }

    fn route(&mut self, block: usize, experts: &[usize]) -> Result<Vec<usize>> {
        let experts_per_block = self.shared.config.experts;
        {
            let mut st = self.shared.lock()?;
            let mut used = vec![false; experts_per_block];
            for &e in experts {
                if let Some(u) = used.get_mut(e) {
                    *u = true;
                }
            }
            let used = |e: usize| used.get(e).copied().unwrap_or(false);
            st.note_routing(block, experts_per_block, used);
            // Drop every expert of this block that the routing does not use.
            for e in (0..experts_per_block).filter(|&e| !used(e)) {
                let piece = Piece::Expert(block, e);
                let guessed = st.guessed.remove(&piece);
                let mut dropped = false;
                if let Some(i) = st.queue.iter().position(|&p| p == piece) {
                    st.queue.remove(i);
                    dropped = true;
                }
                if let Some(section) = st.ready.remove(&piece) {
                    st.keep_section(piece, section);
                    dropped = true;
                }
                if st.loading.contains_key(&piece) {
                    st.cancelled.insert(piece);
                    dropped = true;
                }
                if guessed && dropped {
                    st.stats.predicted_misses += 1;
                }
            }
            // A used expert whose load an earlier routing cancelled is wanted after all; a kept
            // one is ready.
            for &e in experts {
                st.want(Piece::Expert(block, e));
            }
            // Queue the used experts nobody loads yet, after those already queued for this block
            // (and before anything later, of which there is none in the routed order).
            let mut order: Vec<usize> = experts
                .iter()
                .copied()
                .filter(|&e| st.ready.contains_key(&Piece::Expert(block, e)))
                .collect();
            order.extend(
                experts
                    .iter()
                    .copied()
                    .filter(|&e| st.loading.contains_key(&Piece::Expert(block, e))),
            );
            let queued: Vec<usize> = st
                .queue
                .iter()
                .filter_map(|p| match *p {
                    Piece::Expert(l, e) if l == block && used(e) => Some(e),
                    _ => None,
                })
                .collect();
            order.extend(queued);
            let insert_at = st
                .queue
                .iter()
                .rposition(|p| matches!(p, Piece::Expert(l, _) if *l == block))
                .map(|i| i + 1)
                .unwrap_or(0);
            let mut missing = Vec::new();
            for &e in experts {
                if !order.contains(&e) {
                    missing.push(e);
                }
            }
            if self.prefetch != Prefetch::OnDemand {
                for (i, &e) in missing.iter().enumerate() {
                    st.queue.insert(insert_at + i, Piece::Expert(block, e));
                }
            }
            order.extend(missing);
            for &e in experts {
                if st.guessed.remove(&Piece::Expert(block, e)) {
                    st.stats.predicted_hits += 1;
                }
            }
            self.shared.wake_loader(&st);
            drop(st);
            // The pieces after this block follow without a routing.
            if self.prefetch == Prefetch::Routed {
                self.queue_static_from(block + 1)?;
            }
            Ok(order)
        }
    }

    fn with_piece<R>(&mut self, piece: Piece, f: impl FnOnce(PieceWeights<'_>) -> Result<R>) -> Result<R> {
        let shared = self.shared.clone();
        let (section, buf) = {
            let mut st = shared.lock()?;
            if let Some(&at) = st.pass_order.get(&piece) {
                st.position = at;
                // The read position moved: a section the distances kept may now take a queued
                // piece, for an I/O thread that went idle for want of room.
                shared.wake_loader(&st);
            }
            if !st.want(piece) {
                if self.prefetch != Prefetch::OnDemand {
                    st.stats.unrequested += 1;
                }
                st.queue.push_front(piece);
                shared.wake_loader(&st);
            } else if let Some(i) = st.queue.iter().position(|&p| p == piece) {
                // The piece the decoder waits for loads next, whatever was queued before it.
                if i > 0 {
                    st.queue.remove(i);
                    st.queue.push_front(piece);
                    shared.wake_loader(&st);
                }
            }
            let started = Instant::now();
            // The deadline counts from the last load that finished, not from the start of the
            // wait: a slow disk that still delivers (this piece waiting behind others) is not one
            // that does not answer.
            let (mut progress_at, mut loads_seen) = (started, st.stats.loads);
            let section = loop {
                if let Some(e) = &st.error {
                    return Err(Error::runtime(format!("ring-memory inference: {e}")));
                }
                if let Some(section) = st.ready.remove(&piece) {
                    break section;
                }
                // Nobody holds, loads or queues it (cannot happen by the bookkeeping above; if it
                // ever did, waiting would hang): ask for it at once.
                if !st.want(piece) {
                    st.queue.push_front(piece);
                    shared.wake_loader(&st);
                }
                // Queued and a section free, but every I/O thread busy with later pieces: load it
                // here rather than wait (the decoder has nothing else to do meanwhile), unless a
                // load is taking suspiciously long (the read could hang the decoder with it).
                let may_load = st.may_load_itself();
                if let Some((piece, section, mut buf)) = may_load.then(|| st.start_load_of(piece)).flatten() {
                    drop(st);
                    let started = Instant::now();
                    let result = shared.fill(piece, &mut buf);
                    let seconds = started.elapsed().as_secs_f64();
                    st = shared.lock()?;
                    st.finish_load(piece, section, buf, result, seconds);
                    st.stats.self_loads += 1;
                    shared.wake_loader(&st);
                    continue;
                }
                // Every section holds a piece read later, and nothing loads: hand one back (it is
                // queued again) so that this piece can load.
                if !st.has_room_for(piece)
                    && st.unmapping.is_empty()
                    && st.loading.is_empty()
                    && !st.ready.is_empty()
                    && st.queue.front() == Some(&piece)
                {
                    let furthest = st
                        .ready
                        .iter()
                        .map(|(&p, &s)| (p, s))
                        .max_by_key(|&(p, _)| st.distance(p));
                    if let Some((later, section)) = furthest {
                        st.ready.remove(&later);
                        st.free_section(section);
                        st.queue.insert(1, later);
                        shared.wake_loader(&st);
                    }
                }
                shared.wake_loader(&st);
                st.decoder_waiting = true;
                let (next, _) = shared
                    .arrived
                    .wait_timeout(st, Duration::from_millis(500))
                    .map_err(|_| Error::runtime("the ring's state was poisoned by a panic"))?;
                st = next;
                st.decoder_waiting = false;
                if st.stats.loads != loads_seen {
                    (progress_at, loads_seen) = (Instant::now(), st.stats.loads);
                }
                if progress_at.elapsed() > LOAD_DEADLINE {
                    // The ring cannot go on: every later pass fails at once with this (a later
                    // pass would wait behind the same stuck read).
                    let e = format!(
                        "{piece:?} did not load, and no piece did in {} s (the disk or its mount does not answer)",
                        LOAD_DEADLINE.as_secs()
                    );
                    st.error.get_or_insert(e.clone());
                    return Err(Error::runtime(format!("ring-memory inference: {e}")));
                }
            };
            st.stats.stall_seconds += started.elapsed().as_secs_f64();
            let buf = st.sections[section]
                .take()
                .ok_or_else(|| Error::runtime(format!("ring section {section} is not there")))?;
            (section, buf)
        };
        // Whatever happens, the section is given back below (no early return).
        let result = match (&buf, &shared.mapping, shared.host.get(&piece)) {
            (Section::Buffer(buf), _, _) => {
                let len = piece_len(&shared.config, piece).min(self.section_len);
                split_piece(&shared.config, piece, &buf[..len]).and_then(f)
            }
            // Mapped, a piece of the Host tier is read where it is kept.
            (Section::Mapped(_), _, Some(kept)) => split_piece(&shared.config, piece, kept).and_then(f),
            // A read past the end of a mapped file is a fault, not an error: check first.
            (Section::Mapped(map), Some(mapping), None) => match shared.file.changed_size() {
                Ok(false) => mapping
                    .views(piece, map)
                    .and_then(|parts| piece_from_parts(&shared.config, piece, &parts))
                    .and_then(f),
                Ok(true) => Err(Error::runtime(format!(
                    "ring-memory inference: reading {piece:?} in place: {} changed size after it was opened",
                    shared.file.path().display()
                ))),
                Err(e) => Err(e),
            },
            (Section::Mapped(_), None, None) => {
                Err(Error::runtime("a mapped section in a ring that does not map its file"))
            }
        };
        let mut st = shared.lock()?;
        st.sections[section] = Some(buf);
        st.keep_section(piece, section);
        shared.wake_loader(&st);
        result
    }

    fn begin_pass(&mut self) -> Result<()> {
        if !self.in_pass {
            self.in_pass = true;
            return Ok(());
        }
        // The previous pass stopped partway (an error in the decoder): what it queued, guessed and
        // loaded is not what this pass reads. Drop it all and start the pass afresh.
        {
            let mut st = self.shared.lock()?;
            st.queue.clear();
            st.guessed.clear();
            let ready = std::mem::take(&mut st.ready);
            for (piece, section) in ready {
                st.keep_section(piece, section);
            }
            let loading: Vec<Piece> = st.loading.keys().copied().collect();
            st.cancelled.extend(loading);
            self.shared.wake_loader(&st);
        }
        self.queue_static_from(0)
    }

    fn end_pass(&mut self) -> Result<()> {
        self.in_pass = false;
        self.shared.lock()?.stats.passes += 1;
        // The next pass starts the same way whatever it decodes.
        self.queue_static_from(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(sections: usize) -> State {
        State::new(
            (0..sections)
                .map(|_| Section::Buffer(vec![0.0; 4].into_boxed_slice()))
                .collect(),
            None,
            RingStats::default(),
        )
    }

    #[test]
    fn the_decoder_reads_nothing_itself_while_a_load_is_slow() {
        let mut st = state(3);
        assert!(st.may_load_itself());
        st.queue.push_back(Piece::Head);
        let (_, section, buf) = st.start_load().expect("a load starts");
        assert!(st.may_load_itself(), "a load just begun is not suspect");
        // The same load, begun long ago: it may be stuck.
        let long_ago = Instant::now()
            .checked_sub(2 * SUSPECT_LOAD)
            .expect("a clock that ran that long");
        if let Some((_, since)) = st.loading.get_mut(&Piece::Head) {
            *since = long_ago;
        }
        assert!(!st.may_load_itself());
        st.finish_load(Piece::Head, section, buf, Ok(Loaded::from_host(&[0.0])), 2.0);
        assert!(st.may_load_itself(), "the slow load ended");
    }

    #[test]
    fn a_load_cancelled_then_wanted_again_arrives_ready() {
        let piece = Piece::Expert(0, 3);
        for wanted_again in [false, true] {
            let mut st = state(2);
            st.queue.push_back(piece);
            let (p, section, buf) = st.start_load().expect("a load starts");
            assert_eq!(p, piece);
            // The routing drops the guess while it loads...
            st.cancelled.insert(piece);
            // ...and the next routing wants it after all: it must not be queued twice.
            if wanted_again {
                assert!(st.want(piece), "a loading piece is known");
            }
            st.finish_load(
                piece,
                section,
                buf,
                Ok(Loaded {
                    from_file: 16,
                    from_host: 0,
                    mapped: 0,
                }),
                0.0,
            );
            assert_eq!(
                st.ready.contains_key(&piece),
                wanted_again,
                "wanted again: {wanted_again}"
            );
            assert_eq!(st.free.len(), if wanted_again { 1 } else { 2 });
            assert!(st.loading.is_empty() && st.cancelled.is_empty() && st.queue.is_empty());
        }
    }

    #[test]
    fn kept_pieces_are_reused_and_the_one_read_again_last_goes_first() {
        let order = [
            Piece::Attention(0),
            Piece::Expert(0, 0),
            Piece::Expert(0, 1),
            Piece::Attention(1),
            Piece::Head,
        ];
        let sections = (0..2)
            .map(|_| Section::Buffer(vec![0.0; 4].into_boxed_slice()))
            .collect();
        let mut st = State::new(sections, Some(&order), RingStats::default());
        let loaded = |st: &mut State, piece: Piece| {
            st.queue.push_back(piece);
            let (p, section, buf) = st.start_load_of(piece).expect("a load starts");
            st.finish_load(p, section, buf, Ok(Loaded::from_host(&[0.0])), 0.0);
            let section = st.ready.remove(&piece).expect("ready");
            st.keep_section(piece, section);
        };
        // The decoder reads attention 0, then expert 0 of block 0: both kept, no section free.
        st.position = 0;
        loaded(&mut st, Piece::Attention(0));
        st.position = 1;
        loaded(&mut st, Piece::Expert(0, 0));
        assert!(st.free.is_empty() && st.kept.len() == 2);
        // Wanted again: ready without a load.
        assert!(st.want(Piece::Attention(0)));
        assert!(st.ready.contains_key(&Piece::Attention(0)) && st.stats.kept_hits == 1);
        let section = st.ready.remove(&Piece::Attention(0)).expect("ready");
        st.keep_section(Piece::Attention(0), section);
        // At expert 0,1 (place 2), the head (place 4) is read before attention 0 (place 0, next
        // pass) and expert 0,0 (just read): the load takes expert 0,0's section, read again last.
        st.position = 2;
        st.queue.push_back(Piece::Head);
        let (_, section, buf) = st.start_load_of(Piece::Head).expect("room for the head");
        assert_eq!(st.stats.kept_evictions, 1);
        let kept = |st: &State, p: Piece| st.kept.contains_key(&(st.place(p), p));
        assert!(kept(&st, Piece::Attention(0)) && !kept(&st, Piece::Expert(0, 0)));
        st.finish_load(Piece::Head, section, buf, Ok(Loaded::from_host(&[0.0])), 0.0);
        // Attention 0 is now the only kept piece. Reading the head (place 4), attention 0 comes
        // next (the next pass) and expert 0,1 after it: no eviction for expert 0,1. Reading expert
        // 0,0 (place 1), attention 0 comes last: block 1's attention may take its section.
        st.position = 4;
        assert!(
            !st.has_room_for(Piece::Expert(0, 1)),
            "from the head, expert 0,1 is read after attention 0: no eviction for it"
        );
        st.position = 1;
        assert!(
            st.has_room_for(Piece::Attention(1)),
            "attention 1 is read before attention 0"
        );
    }

    #[test]
    fn the_victim_is_the_kept_piece_expected_furthest_ahead() {
        let order: Vec<Piece> = (0..3)
            .flat_map(|l| std::iter::once(Piece::Attention(l)).chain((0..4).map(move |e| Piece::Expert(l, e))))
            .chain(std::iter::once(Piece::Head))
            .collect();
        let mut st = State::new(Vec::new(), Some(&order), RingStats::default());
        assert_eq!(st.victim(), None);
        let keep = |st: &mut State, pieces: &[Piece]| {
            st.kept.clear();
            for (section, &piece) in pieces.iter().enumerate() {
                st.kept.insert((st.place(piece), piece), section);
            }
        };
        // Every expert routed to by every pass: the victim is the piece read again last, from
        // every place, whichever pieces are kept.
        st.heat.iter_mut().for_each(|h| *h = 1.0);
        let mut checked = 0;
        for mask in 1u32..(1 << 6) {
            let pieces: Vec<Piece> = [0, 3, 5, 9, 12, 15]
                .iter()
                .enumerate()
                .filter(|&(bit, _)| mask & (1 << bit) != 0)
                .map(|(_, &i)| order[i])
                .collect();
            keep(&mut st, &pieces);
            for position in 0..order.len() {
                st.position = position;
                let furthest = pieces.iter().map(|&p| (p, st.distance(p))).max_by_key(|&(_, d)| d);
                assert_eq!(st.victim(), furthest, "kept {pieces:?}, position {position}");
                checked += 1;
            }
        }
        assert_eq!(checked, 63 * order.len());
        // Routing history counts. Block 1 routes to expert 0 in every pass and to expert 1 in every
        // other pass; expert 2 never: expert 2 goes first, then expert 1, although both are read
        // before attention 2 in the pass, and attention 2 goes only after both.
        st.heat.iter_mut().for_each(|h| *h = 0.0);
        for pass in 0..40 {
            st.note_routing(1, 4, |e| e == 0 || (e == 1 && pass % 2 == 0));
        }
        let heat = |st: &State, e: usize| st.heat[st.place(Piece::Expert(1, e))];
        assert!(heat(&st, 0) > 0.98 && (0.4..0.6).contains(&heat(&st, 1)) && heat(&st, 2) == 0.0);
        st.position = st.place(Piece::Head);
        let (e0, e1, e2, a2) = (
            Piece::Expert(1, 0),
            Piece::Expert(1, 1),
            Piece::Expert(1, 2),
            Piece::Attention(2),
        );
        keep(&mut st, &[e0, e1, e2, a2]);
        assert_eq!(st.victim().map(|v| v.0), Some(e2));
        keep(&mut st, &[e0, e1, a2]);
        assert_eq!(st.victim().map(|v| v.0), Some(e1));
        keep(&mut st, &[e0, a2]);
        assert_eq!(
            st.victim().map(|v| v.0),
            Some(a2),
            "expert 1,0 is read sooner than attention 2"
        );
        // A load of a piece the pass reads now may take a cold expert's section, not a hot one's.
        keep(&mut st, &[e0, e2]);
        st.position = st.place(Piece::Attention(1));
        assert!(st.has_room_for(Piece::Attention(1)));
        assert!(
            st.has_room_for(Piece::Expert(1, 3)),
            "expert 1,2 is expected back much later"
        );
        keep(&mut st, &[e0]);
        assert!(
            !st.has_room_for(Piece::Head),
            "expert 1,0 is read before the head of this pass"
        );
    }

    #[test]
    fn a_failed_load_frees_its_section_and_is_reported() {
        let mut st = state(1);
        st.queue.push_back(Piece::Head);
        let (p, section, buf) = st.start_load().expect("a load starts");
        assert!(st.start_load().is_none(), "no free section for a second load");
        st.finish_load(p, section, buf, Err(Error::runtime("disk gone")), 0.0);
        assert_eq!(st.free, vec![0]);
        assert!(st.ready.is_empty());
        assert!(st
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Head") && e.contains("disk gone")));
    }
}
