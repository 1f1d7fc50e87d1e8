//! Several sequences decoded together: the engine behind `semoe generate` and `semoe serve`.
//!
//! A [`BatchDecoder`] holds up to `max_batch` sequences. [`BatchDecoder::admit`] adds one (its prompt
//! is encoded at the next step); every [`BatchDecoder::step`] draws one byte for each sequence in
//! the batch, and a sequence leaves the batch after its last byte (or when cancelled). New
//! sequences may join between any two steps (continuous batching).

use super::decoder::{Decoder, KvCache, Row};
use super::generate::{check_options, pick, SampleOptions};
use super::weights::{ResidentWeights, WeightSource};
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::model::gpt::Gpt;
use rand::SeedableRng;

/// The most rows one forward pass computes (a batch's prompts beyond it take several passes).
pub const MAX_ROWS: usize = 256;

/// A sequence's handle inside one [`BatchDecoder`].
pub type SeqId = u64;

/// The token an empty prompt starts from: a newline, as at the start of a line of text.
pub const EMPTY_PROMPT_TOKEN: u8 = b'\n';

/// Refuse a prompt the model cannot read, naming why: a byte at or above its vocabulary, or, for
/// an empty prompt, a vocabulary without the newline it starts from.
pub fn check_prompt(prompt: &[u8], vocab: usize) -> Result<()> {
    if let Some(at) = prompt.iter().position(|&b| usize::from(b) >= vocab) {
        return Err(Error::config(format!(
            "the prompt's byte {at} is {}, outside the model's vocabulary of {vocab} bytes",
            prompt[at]
        )));
    }
    if prompt.is_empty() && usize::from(EMPTY_PROMPT_TOKEN) >= vocab {
        return Err(Error::config(format!(
            "an empty prompt starts from a newline (byte {EMPTY_PROMPT_TOKEN}), outside the model's vocabulary of \
             {vocab} bytes: give a prompt"
        )));
    }
    Ok(())
}

/// One byte drawn by [`BatchDecoder::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emitted {
    /// The sequence it belongs to.
    pub id: SeqId,
    /// The byte.
    pub byte: u8,
    /// Whether it was the sequence's last byte (the sequence has left the batch).
    pub finished: bool,
}

/// What [`BatchDecoder::step_isolating`] did: the bytes drawn, and the sequences that failed on
/// their own (each left the batch, its cache slot freed).
#[derive(Debug, Default)]
pub struct StepOutcome {
    /// One byte for every sequence that stepped, in admission order.
    pub emitted: Vec<Emitted>,
    /// The sequences that failed when stepped alone, with why.
    pub failed: Vec<(SeqId, Error)>,
}

/// A sequence in the batch: the tokens whose keys and values are in its cache slot (its window),
/// and the byte drawn last, not yet encoded.
struct Sequence {
    id: SeqId,
    slot: usize,
    /// Tokens encoded in the cache, at positions `0..window.len()`.
    window: Vec<u32>,
    /// Tokens to encode at the next step (the prompt, then each drawn byte).
    pending: Vec<u32>,
    opts: SampleOptions,
    rng: rand_chacha::ChaCha8Rng,
    emitted: usize,
    logits: Vec<f32>,
}

/// Batched generation from one model, whose weights come from `S` (the whole model in memory by
/// default; see [`WeightSource`]).
///
/// Each sequence sees a window of at most `block_size` tokens (the model's context). When its
/// window is full, the oldest tokens are dropped down to the newest `block_size / 2`, which are
/// encoded again at positions from 0 together with the next token (learned absolute positions
/// make a sliding window impossible to cache). Between two such shifts every byte costs one
/// position's work.
pub struct BatchDecoder<S: WeightSource = ResidentWeights> {
    source: S,
    decoder: Decoder,
    cache: KvCache,
    max_batch: usize,
    next_id: SeqId,
    seqs: Vec<Sequence>,
}

impl BatchDecoder<ResidentWeights> {
    /// A decoder for a copy of `model` (its MoE blocks route dropless here) holding at most
    /// `max_batch` sequences at once. [`BatchDecoder::from_model`] takes the model instead of
    /// copying it, when the caller has no other use for it (one copy of a large model in memory).
    pub fn new(model: &Gpt<f32>, cpu: Cpu, max_batch: usize) -> Result<Self> {
        BatchDecoder::from_model(model.clone(), cpu, max_batch)
    }

    /// [`BatchDecoder::new`] owning `model`.
    pub fn from_model(model: Gpt<f32>, cpu: Cpu, max_batch: usize) -> Result<Self> {
        BatchDecoder::with_source(ResidentWeights::new(model), cpu, max_batch)
    }
}

impl<S: WeightSource> BatchDecoder<S> {
    /// A decoder reading its weights from `source`, holding at most `max_batch` sequences (each
    /// with a key/value cache of [`KvCache::slot_bytes`]).
    pub fn with_source(source: S, cpu: Cpu, max_batch: usize) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::config("the batch must hold at least one sequence"));
        }
        let config = source.config().clone();
        config.validate()?;
        Ok(BatchDecoder {
            decoder: Decoder::new(&config, cpu),
            cache: KvCache::new(&config, max_batch)?,
            source,
            max_batch,
            next_id: 0,
            seqs: Vec::new(),
        })
    }

    /// The weight source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Bytes of the key/value cache (all `max_batch` sequences).
    pub fn cache_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// The most sequences the batch holds.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Sequences in the batch.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    /// Whether [`BatchDecoder::admit`] would accept another sequence.
    pub fn has_room(&self) -> bool {
        self.seqs.len() < self.max_batch
    }

    /// Add a sequence continuing `prompt` (an empty prompt starts from a newline; of a longer prompt
    /// than the context, the last `block_size` bytes); it draws its first byte at the next step.
    /// Refused when the batch is full, when `opts.max_tokens` is 0, or when the options are invalid
    /// (the error names the option).
    pub fn admit(&mut self, prompt: &[u8], opts: &SampleOptions) -> Result<SeqId> {
        check_options(opts)?;
        if opts.max_tokens == 0 {
            return Err(Error::config("max_tokens must be at least 1"));
        }
        if !self.has_room() {
            return Err(Error::runtime(format!(
                "the batch is full ({} sequences)",
                self.max_batch
            )));
        }
        check_prompt(prompt, self.source.config().vocab)?;
        let slot = self
            .cache
            .take()
            .ok_or_else(|| Error::runtime("no free key/value cache slot"))?;
        let id = self.next_id;
        self.next_id += 1;
        let block = self.source.config().block_size;
        let pending = if prompt.is_empty() {
            vec![u32::from(EMPTY_PROMPT_TOKEN)]
        } else {
            prompt[prompt.len().saturating_sub(block)..]
                .iter()
                .map(|&b| b as u32)
                .collect()
        };
        self.seqs.push(Sequence {
            id,
            slot,
            window: Vec::with_capacity(block),
            pending,
            opts: opts.clone(),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed),
            emitted: 0,
            logits: Vec::new(),
        });
        Ok(id)
    }

    /// Remove a sequence from the batch; false if it was not there.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        match self.seqs.iter().position(|s| s.id == id) {
            Some(i) => {
                let seq = self.seqs.remove(i);
                self.cache.release(seq.slot);
                true
            }
            None => false,
        }
    }

    /// The logits a sequence's last byte was drawn from, and the window (tokens at positions
    /// `0..`) they were computed over; `None` for a sequence not in the batch or before its first
    /// step.
    pub fn last_logits(&self, id: SeqId) -> Option<(&[f32], &[u32])> {
        self.seqs
            .iter()
            .find(|s| s.id == id && !s.logits.is_empty())
            .map(|s| (s.logits.as_slice(), s.window.as_slice()))
    }

    /// Draw one byte for every sequence in the batch, in admission order. A step that fails (a
    /// weight that cannot be read, a non-finite gate) leaves every sequence as it was: the next
    /// step encodes the same tokens again.
    pub fn step(&mut self) -> Result<Vec<Emitted>> {
        let block = self.source.config().block_size;
        let vocab = self.source.config().vocab;
        let keep = block / 2;
        // Each sequence's rows and its window after them, planned without touching the sequence.
        let mut rows = Vec::new();
        let mut want = Vec::with_capacity(self.seqs.len());
        let mut windows = Vec::with_capacity(self.seqs.len());
        for seq in &self.seqs {
            let (mut window, tokens) = if seq.window.len() + seq.pending.len() > block {
                // The window is full: encode the newest `keep` tokens again from position 0.
                let mut kept = seq.window[seq.window.len() - keep.min(seq.window.len())..].to_vec();
                kept.extend_from_slice(&seq.pending);
                let from = kept.len().saturating_sub(block);
                (Vec::with_capacity(block), kept.split_off(from))
            } else {
                (seq.window.clone(), seq.pending.clone())
            };
            if tokens.is_empty() {
                return Err(Error::runtime(format!("sequence {} has nothing to encode", seq.id)));
            }
            for &token in &tokens {
                rows.push(Row {
                    slot: seq.slot,
                    pos: window.len(),
                    token,
                });
                window.push(token);
            }
            want.push(rows.len() - 1);
            windows.push(window);
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // At most MAX_ROWS rows per pass (long prompts of a full batch take several passes): the
        // activations stay bounded, and the bits are the same, since each row reads the cache of
        // the positions before it, written by this pass or an earlier one.
        let mut logits = Vec::with_capacity(want.len() * vocab);
        let mut wanted = want.iter().peekable();
        for (c, chunk) in rows.chunks(MAX_ROWS).enumerate() {
            let start = c * MAX_ROWS;
            let mut local = Vec::new();
            while let Some(&&w) = wanted.peek() {
                if w >= start + chunk.len() {
                    break;
                }
                local.push(w - start);
                wanted.next();
            }
            logits.extend(self.decoder.forward(&mut self.source, &mut self.cache, chunk, &local)?);
        }
        for (seq, window) in self.seqs.iter_mut().zip(windows) {
            seq.window = window;
            seq.pending.clear();
        }
        let mut out = Vec::with_capacity(self.seqs.len());
        for (seq, last) in self.seqs.iter_mut().zip(logits.chunks_exact(vocab)) {
            let byte = pick(last, &seq.opts, &mut seq.rng);
            seq.logits.clear();
            seq.logits.extend_from_slice(last);
            seq.pending.push(byte as u32);
            seq.emitted += 1;
            out.push(Emitted {
                id: seq.id,
                byte,
                finished: seq.emitted >= seq.opts.max_tokens,
            });
        }
        let cache = &mut self.cache;
        self.seqs.retain(|s| {
            let live = s.emitted < s.opts.max_tokens;
            if !live {
                cache.release(s.slot);
            }
            live
        });
        Ok(out)
    }

    /// [`BatchDecoder::step`], but one sequence's non-finite values fail that sequence only: a
    /// batch whose step meets a non-finite value (a NaN embedding row of one byte, a gate that
    /// overflows on one prompt) is stepped again one sequence at a time, and the sequences that fail
    /// alone leave the batch, each with its error; the others draw their byte. Rows never mix in a
    /// pass (each reads its own cache slot), so a sequence fails alone exactly when its own rows are
    /// not finite; a step that failed rewrites the same cache positions when it runs again.
    ///
    /// Any other failure of the whole batch (a weight that cannot be read) is returned as `step`
    /// returns it, every sequence as it was. A failure during the retries fails that sequence.
    /// `before_retry` is called before each retry (each a pass over the weights: a server's stall
    /// clock counts per pass, not the whole retry).
    pub fn step_isolating(&mut self, before_retry: &mut dyn FnMut()) -> Result<StepOutcome> {
        let failure = match self.step() {
            Ok(emitted) => {
                return Ok(StepOutcome {
                    emitted,
                    failed: Vec::new(),
                })
            }
            Err(e) => e,
        };
        if self.seqs.len() < 2 || !matches!(failure, Error::NonFinite { .. }) {
            return Err(failure);
        }
        let mut outcome = StepOutcome::default();
        let mut kept = Vec::with_capacity(self.seqs.len());
        for seq in std::mem::take(&mut self.seqs) {
            let id = seq.id;
            self.seqs.push(seq);
            before_retry();
            match self.step() {
                Ok(emitted) => outcome.emitted.extend(emitted),
                Err(e) => {
                    for failed in self.seqs.drain(..) {
                        self.cache.release(failed.slot);
                    }
                    outcome.failed.push((id, e));
                }
            }
            // A sequence whose last byte this was has already left (`step` released its slot).
            kept.append(&mut self.seqs);
        }
        self.seqs = kept;
        Ok(outcome)
    }
}

/// A batch decoder whatever its weight source: what a server or a command holds without naming
/// the source (the whole model in memory, or a ring).
pub trait Decode: Send {
    /// See [`BatchDecoder::max_batch`].
    fn max_batch(&self) -> usize;
    /// The model's vocabulary (prompt bytes must be below it).
    fn vocab(&self) -> usize;
    /// See [`BatchDecoder::active`].
    fn active(&self) -> usize;
    /// See [`BatchDecoder::has_room`].
    fn has_room(&self) -> bool;
    /// See [`BatchDecoder::admit`].
    fn admit(&mut self, prompt: &[u8], opts: &SampleOptions) -> Result<SeqId>;
    /// See [`BatchDecoder::cancel`].
    fn cancel(&mut self, id: SeqId) -> bool;
    /// See [`BatchDecoder::step`].
    fn step(&mut self) -> Result<Vec<Emitted>>;
    /// See [`BatchDecoder::step_isolating`]; by default [`Decode::step`], failing every sequence
    /// together.
    fn step_isolating(&mut self, _before_retry: &mut dyn FnMut()) -> Result<StepOutcome> {
        self.step().map(|emitted| StepOutcome {
            emitted,
            failed: Vec::new(),
        })
    }
    /// A failure every later step will meet (the weights can no longer be read), if there is one:
    /// a server reports itself failed for good rather than for a while.
    fn broken(&self) -> Option<String> {
        None
    }
}

impl<S: WeightSource + Send> Decode for BatchDecoder<S> {
    fn max_batch(&self) -> usize {
        BatchDecoder::max_batch(self)
    }
    fn vocab(&self) -> usize {
        self.source.config().vocab
    }
    fn active(&self) -> usize {
        BatchDecoder::active(self)
    }
    fn has_room(&self) -> bool {
        BatchDecoder::has_room(self)
    }
    fn admit(&mut self, prompt: &[u8], opts: &SampleOptions) -> Result<SeqId> {
        BatchDecoder::admit(self, prompt, opts)
    }
    fn cancel(&mut self, id: SeqId) -> bool {
        BatchDecoder::cancel(self, id)
    }
    fn step(&mut self) -> Result<Vec<Emitted>> {
        BatchDecoder::step(self)
    }
    fn step_isolating(&mut self, before_retry: &mut dyn FnMut()) -> Result<StepOutcome> {
        BatchDecoder::step_isolating(self, before_retry)
    }
    fn broken(&self) -> Option<String> {
        self.source.failure()
    }
}
