//! Several sequences decoded together: the engine behind `semoe generate` and `semoe serve`.
//!
//! A [`BatchDecoder`] holds up to `max_batch` sequences. [`BatchDecoder::admit`] adds one (its prompt
//! is encoded at the next step); every [`BatchDecoder::step`] draws one byte for each sequence in
//! the batch, and a sequence leaves the batch after its last byte (or when cancelled). New
//! sequences may join between any two steps (continuous batching).

use super::generate::{check_options, pick, SampleOptions};
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use crate::model::gpt::Gpt;
use rand::SeedableRng;

/// A sequence's handle inside one [`BatchDecoder`].
pub type SeqId = u64;

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

struct Sequence {
    id: SeqId,
    context: Vec<u32>,
    opts: SampleOptions,
    rng: rand_chacha::ChaCha8Rng,
    emitted: usize,
}

/// Batched generation from one model.
pub struct BatchDecoder {
    model: Gpt<f32>,
    cpu: Cpu,
    max_batch: usize,
    next_id: SeqId,
    seqs: Vec<Sequence>,
}

impl BatchDecoder {
    /// A decoder for `model` (its MoE blocks route dropless here) holding at most `max_batch`
    /// sequences at once.
    pub fn new(model: &Gpt<f32>, cpu: Cpu, max_batch: usize) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::config("the batch must hold at least one sequence"));
        }
        Ok(BatchDecoder {
            model: model.for_inference()?,
            cpu,
            max_batch,
            next_id: 0,
            seqs: Vec::new(),
        })
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

    /// Add a sequence continuing `prompt` (an empty prompt starts from a newline); it draws its
    /// first byte at the next step. Refused when the batch is full, when `opts.max_tokens` is 0, or
    /// when the options are invalid (the error names the option).
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
        let id = self.next_id;
        self.next_id += 1;
        let context = if prompt.is_empty() {
            vec![b'\n' as u32]
        } else {
            prompt.iter().map(|&b| b as u32).collect()
        };
        self.seqs.push(Sequence {
            id,
            context,
            opts: opts.clone(),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed),
            emitted: 0,
        });
        Ok(id)
    }

    /// Remove a sequence from the batch; false if it was not there.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() != before
    }

    /// Draw one byte for every sequence in the batch, in admission order.
    pub fn step(&mut self) -> Result<Vec<Emitted>> {
        let block = self.model.config().block_size;
        let vocab = self.model.config().vocab;
        let mut out = Vec::with_capacity(self.seqs.len());
        for seq in &mut self.seqs {
            let window = &seq.context[seq.context.len().saturating_sub(block)..];
            let logits = self.cpu.install(|| self.model.logits(&self.cpu, window, 1))?;
            let last = &logits[(window.len() - 1) * vocab..];
            let byte = pick(last, &seq.opts, &mut seq.rng);
            seq.context.push(byte as u32);
            seq.emitted += 1;
            out.push(Emitted {
                id: seq.id,
                byte,
                finished: seq.emitted >= seq.opts.max_tokens,
            });
        }
        self.seqs.retain(|s| s.emitted < s.opts.max_tokens);
        Ok(out)
    }
}
