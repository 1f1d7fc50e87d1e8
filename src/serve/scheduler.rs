//! The decoder thread: one OS thread owns the batch decoder ([`Decode`]) and runs its steps, so that compute
//! never blocks tokio's threads; requests reach it through a bounded queue.
//!
//! Between two steps it takes every newly queued request into a waiting list of its own (dropping
//! those whose client has left, so that they do not hold a place in the queue), admits waiting
//! requests while the batch has room (continuous batching), and hands each drawn byte to its
//! request's channel. The channel is bounded: the thread never waits
//! on a client. A byte that does not fit is kept with its sequence and sent with the next ones; a
//! channel that stays full past the client timeout, or that its client closed, cancels the
//! sequence and frees its slot.

use crate::infer::{Decode, SampleOptions, SeqId};
use crate::telemetry::metrics as names;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TrySendError};

/// Events a request's channel holds before the decoder thread keeps bytes back for a slow client (the
/// bytes use all but the last slot, which stays free for the final event).
pub const CHANNEL_EVENTS: usize = 32;

/// How long the idle decoder thread waits for a request before it looks at its flags again.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// What the decoder thread sends to a request.
#[derive(Debug)]
pub enum Event {
    /// Bytes drawn, in order (one or a few).
    Bytes(Vec<u8>),
    /// The sequence is complete.
    Done(Finished),
    /// The sequence was stopped; the failure says why.
    Failed(Failure),
}

/// Why a sequence was stopped before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure (the HTTP status of a whole response).
    pub kind: FailureKind,
    /// What happened, for the client.
    pub message: String,
}

/// The kinds of [`Failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The server is shutting down (503).
    Shutdown,
    /// The decoder refused the request (400): for example a prompt byte outside the model's
    /// vocabulary.
    Invalid,
    /// The computation failed (500): a weight that cannot be read, a non-finite gate.
    Compute,
    /// The client left its stream unread for longer than the client timeout.
    Timeout,
}

impl Failure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// Counts and timing of a completed sequence.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Bytes of the prompt.
    pub prompt_bytes: usize,
    /// Bytes generated.
    pub generated_bytes: usize,
    /// Time in the queue before the sequence joined the batch.
    pub queued: Duration,
    /// Time from joining the batch to the last byte.
    pub generating: Duration,
}

/// A request for the decoder thread.
#[derive(Debug)]
pub struct Job {
    /// The prompt's bytes.
    pub prompt: Vec<u8>,
    /// How to sample.
    pub opts: SampleOptions,
    /// Where its events go.
    pub events: mpsc::Sender<Event>,
    /// When it was queued.
    pub queued_at: Instant,
}

/// Why a request could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Full,
    /// The server is shutting down.
    Closed,
    /// The decoder thread has stopped (it panicked): nothing can be served.
    Stopped,
}

/// Figures shared by the decoder thread and the HTTP side (for `/health`); the same figures go to
/// the metrics recorder.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences in the batch.
    pub active: AtomicUsize,
    /// Requests waiting in the queue.
    pub queued: AtomicUsize,
    /// The most sequences the batch has held at once.
    pub peak_batch: AtomicUsize,
    /// Decoder steps run.
    pub steps: AtomicU64,
    /// Bytes generated.
    pub generated_bytes: AtomicU64,
    /// Whether the decoder thread has ended (see [`Stats::decoder_ended`]).
    pub decoder_ended: AtomicBool,
    /// The error of the decoder's last step and when it came, when it failed; cleared by a step
    /// that succeeds. For [`FAILING_FOR`] after it, `/health` reports the server as failing.
    pub last_error: Mutex<Option<(String, Instant)>>,
    /// A failure every later step will meet ([`Decode::broken`]), once a step has failed with
    /// it: `/health` reports the server failed from then on, so that an orchestrator restarts it.
    pub broken: Mutex<Option<String>>,
    /// When the step running now started (`None` between steps): a step that never ends (a
    /// weight read the decoder waits on itself, which no deadline can cut) shows in `/health`.
    pub step_started: Mutex<Option<Instant>>,
}

/// How long a decoder step may run before `/health` reports the server stalled. A step is one
/// position of every sequence (or a prompt's prefill); through a ring on a slow disk it may take
/// minutes and still progress (the ring fails a read only after 2 minutes without any load
/// finishing), so only a step far past anything that serves is called stalled: a read the decoder
/// waits on itself that never returns, which no deadline can cut.
pub const STALLED_AFTER: Duration = Duration::from_secs(15 * 60);

/// How long `/health` reports a failed step: long enough for a probe to see it, short enough that
/// one passing fault does not keep an idle server (no step runs without requests) out of a load
/// balancer for good. A lasting fault fails every step, so it shows again with the next request.
pub const FAILING_FOR: Duration = Duration::from_secs(30);

impl Stats {
    /// The failure of the decoder's last step, if it failed within [`FAILING_FOR`].
    pub fn last_error(&self) -> Option<String> {
        let last = self.last_error.lock().unwrap_or_else(PoisonError::into_inner);
        last.as_ref()
            .filter(|(_, at)| at.elapsed() < FAILING_FOR)
            .map(|(e, _)| e.clone())
    }

    /// The decoder's lasting failure, if a step has met one.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How long the step running now has run, once that is longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        let started = *self.step_started.lock().unwrap_or_else(PoisonError::into_inner);
        started.map(|at| at.elapsed()).filter(|ran| *ran > limit)
    }

    fn set_step_started(&self, at: Option<Instant>) {
        *self.step_started.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    fn set_last_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = error.map(|e| (e, Instant::now()));
    }
}

/// The HTTP side's handle on the decoder thread.
#[derive(Clone, Debug)]
pub struct Queue {
    jobs: std_mpsc::Sender<Job>,
    /// The most requests waiting at once (queued and not yet in the batch).
    capacity: usize,
    closing: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

impl Queue {
    /// Queue a request, without waiting. The queue's bound is the count of waiting requests
    /// ([`Stats::queued`]), from which the decoder thread takes those whose client has left.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Refused::Closed);
        }
        if self.stats.decoder_ended.load(Ordering::SeqCst) {
            return Err(Refused::Stopped);
        }
        // Counted before it is sent, so that the decoder thread never takes away more than was added.
        let capacity = self.capacity;
        if self
            .stats
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < capacity).then_some(n + 1))
            .is_err()
        {
            return Err(Refused::Full);
        }
        match self.jobs.send(job) {
            Ok(()) => {
                metrics::gauge!(names::SERVE_QUEUED).increment(1.0);
                Ok(())
            }
            Err(_) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                Err(if self.closing.load(Ordering::SeqCst) {
                    Refused::Closed
                } else {
                    Refused::Stopped
                })
            }
        }
    }

    /// Refuse every request from now on (the server is shutting down).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Whether [`Queue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The shared figures.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// Count a request's outcome (`ok`, `cancelled`, `timeout`, `shutdown`, `error`, and on the HTTP
/// side `rejected`, `overloaded`).
pub fn count_outcome(outcome: &'static str) {
    metrics::counter!(names::SERVE_REQUESTS, "outcome" => outcome).increment(1);
}

/// A sequence in the batch, as the decoder thread knows it.
struct Running {
    events: mpsc::Sender<Event>,
    /// Bytes drawn but not yet taken by the channel.
    pending: Vec<u8>,
    /// Since when the channel has refused bytes.
    full_since: Option<Instant>,
    prompt_bytes: usize,
    generated: usize,
    queued: Duration,
    admitted_at: Instant,
    /// Set when its last byte was drawn: it has left the batch and waits for its channel.
    finished: Option<Finished>,
}

/// What became of a delivery attempt.
enum Delivery {
    /// Everything sent so far is in the channel.
    Sent,
    /// Some bytes wait for room.
    Waiting,
    /// The client has gone, or has not read for longer than the client timeout.
    Gone(&'static str),
}

impl Running {
    /// Hand the pending bytes (and the end, once finished) to the channel, without waiting. A
    /// client that has left its events unread past the timeout gets a last event saying so (the
    /// channel's last slot is kept free for it) and is [`Delivery::Gone`].
    fn deliver(&mut self, client_timeout: Duration, now: Instant) -> Delivery {
        let delivery = self.try_deliver(client_timeout, now);
        if let Delivery::Gone("timeout") = delivery {
            let _ = self.events.try_send(Event::Failed(Failure::new(
                FailureKind::Timeout,
                format!(
                    "the stream was left unread for longer than the client timeout ({})",
                    humantime::format_duration(client_timeout)
                ),
            )));
        }
        delivery
    }

    fn try_deliver(&mut self, client_timeout: Duration, now: Instant) -> Delivery {
        if !self.pending.is_empty() {
            // Bytes leave the channel's last slot free: the last word (a failure at shutdown,
            // sent without waiting) must always fit, or the client would see the stream cut.
            if self.events.capacity() <= 1 && !self.events.is_closed() {
                return self.stalled(client_timeout, now);
            }
            match self.events.try_send(Event::Bytes(std::mem::take(&mut self.pending))) {
                Ok(()) => self.full_since = None,
                Err(TrySendError::Full(Event::Bytes(bytes))) => {
                    self.pending = bytes;
                    return self.stalled(client_timeout, now);
                }
                Err(TrySendError::Full(_)) => return self.stalled(client_timeout, now),
                Err(TrySendError::Closed(_)) => return Delivery::Gone("cancelled"),
            }
        }
        if let Some(f) = self.finished.take() {
            match self.events.try_send(Event::Done(f)) {
                // Complete: the client may close its end as soon as it has the last event.
                Ok(()) => return Delivery::Sent,
                Err(TrySendError::Full(Event::Done(f))) => {
                    self.finished = Some(f);
                    return self.stalled(client_timeout, now);
                }
                Err(TrySendError::Full(_)) => return self.stalled(client_timeout, now),
                Err(TrySendError::Closed(_)) => return Delivery::Gone("cancelled"),
            }
        }
        if self.events.is_closed() {
            return Delivery::Gone("cancelled");
        }
        Delivery::Sent
    }

    fn stalled(&mut self, client_timeout: Duration, now: Instant) -> Delivery {
        let since = *self.full_since.get_or_insert(now);
        if now.duration_since(since) > client_timeout {
            Delivery::Gone("timeout")
        } else {
            Delivery::Waiting
        }
    }
}

/// The decoder thread's state.
pub struct Scheduler {
    decoder: Box<dyn Decode>,
    jobs: std_mpsc::Receiver<Job>,
    /// Requests taken from the channel, waiting for room in the batch, oldest first.
    waiting: VecDeque<Job>,
    running: HashMap<SeqId, Running>,
    /// Sequences that left the batch and whose last events wait for room in their channel.
    draining: Vec<Running>,
    client_timeout: Duration,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    /// The active count last given to the gauge (which is shared by every server in the process).
    reported_active: usize,
}

impl Scheduler {
    /// A scheduler for `decoder` with a queue of `capacity` requests, and its HTTP-side handle.
    /// `stop` ends the thread: every request still running or queued then fails.
    pub fn new(
        decoder: Box<dyn Decode>,
        capacity: usize,
        client_timeout: Duration,
        stop: Arc<AtomicBool>,
    ) -> (Scheduler, Queue) {
        let (tx, rx) = std_mpsc::channel();
        let stats = Arc::new(Stats::default());
        let queue = Queue {
            jobs: tx,
            capacity,
            closing: Arc::new(AtomicBool::new(false)),
            stats: Arc::clone(&stats),
        };
        let scheduler = Scheduler {
            decoder,
            jobs: rx,
            waiting: VecDeque::new(),
            running: HashMap::new(),
            draining: Vec::new(),
            client_timeout,
            stats,
            stop,
            reported_active: 0,
        };
        (scheduler, queue)
    }

    /// Run until `stop` is set or every queue handle is dropped (and nothing is left to do). When
    /// it ends, for whatever reason (a panic included), new requests are refused.
    pub fn run(mut self) {
        struct Ended(Arc<Stats>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.decoder_ended.store(true, Ordering::SeqCst);
            }
        }
        let _ended = Ended(Arc::clone(&self.stats));
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        if let Err(panic) = ran {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            self.after_panic(&why);
            // The thread still ends with the panic (its message went to stderr as it happened):
            // the server reports it when it joins the thread, as before.
            std::panic::resume_unwind(panic);
        }
        self.report_active();
    }

    /// After a panic in the loop: answer every request held (500, naming the panic) and take them
    /// out of the figures, without touching the decoder (its state is unknown). New requests are
    /// refused from here on.
    fn after_panic(&mut self, why: &str) {
        self.stats.decoder_ended.store(true, Ordering::SeqCst);
        while let Ok(job) = self.jobs.try_recv() {
            self.waiting.push_back(job);
        }
        // The figures first, then the answers: a client that reads its 500 and asks `/health`
        // sees none of it counted.
        self.stats.active.store(0, Ordering::SeqCst);
        metrics::gauge!(names::SERVE_ACTIVE).decrement(self.reported_active as f64);
        self.reported_active = 0;
        self.stats.queued.fetch_sub(self.waiting.len(), Ordering::SeqCst);
        metrics::gauge!(names::SERVE_QUEUED).decrement(self.waiting.len() as f64);
        let message = format!("generation stopped: the decoder thread panicked ({why})");
        let failed = || Event::Failed(Failure::new(FailureKind::Compute, message.clone()));
        let running = self.running.drain().map(|(_, r)| r.events);
        let draining = self.draining.drain(..).map(|r| r.events);
        let waiting = self.waiting.drain(..).map(|job| job.events);
        for events in running.chain(draining).chain(waiting) {
            count_outcome("error");
            let _ = events.try_send(failed());
        }
    }

    fn run_loop(&mut self) {
        let mut disconnected = false;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                self.fail_all("the server is shutting down");
                break;
            }
            disconnected |= self.take_queued();
            self.admit_waiting();
            self.deliver_all();
            if self.decoder.active() == 0 {
                if disconnected && self.draining.is_empty() && self.waiting.is_empty() {
                    break;
                }
                // Idle: wait for a request (or a little, while a client reads its last bytes).
                let wait = if self.draining.is_empty() {
                    IDLE_WAIT
                } else {
                    Duration::from_millis(2)
                };
                match self.jobs.recv_timeout(wait) {
                    Ok(job) => self.waiting.push_back(job),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
                }
                continue;
            }
            self.step();
        }
    }

    /// Move every request sent since the last look into the waiting list, and drop the waiting
    /// requests whose client has left; true when every sender is gone.
    fn take_queued(&mut self) -> bool {
        let disconnected = loop {
            match self.jobs.try_recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(std_mpsc::TryRecvError::Empty) => break false,
                Err(std_mpsc::TryRecvError::Disconnected) => break true,
            }
        };
        let stats = &self.stats;
        self.waiting.retain(|job| {
            if job.events.is_closed() {
                // Its client went away while it waited: its place in the queue is free again.
                stats.queued.fetch_sub(1, Ordering::SeqCst);
                metrics::gauge!(names::SERVE_QUEUED).decrement(1.0);
                count_outcome("cancelled");
                false
            } else {
                true
            }
        });
        disconnected
    }

    /// Admit waiting requests, oldest first, while the batch has room.
    fn admit_waiting(&mut self) {
        while self.decoder.has_room() {
            match self.waiting.pop_front() {
                Some(job) => self.admit(job),
                None => return,
            }
        }
    }

    fn admit(&mut self, job: Job) {
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(names::SERVE_QUEUED).decrement(1.0);
        if job.events.is_closed() {
            // Its client went away while it waited.
            count_outcome("cancelled");
            return;
        }
        match self.decoder.admit(&job.prompt, &job.opts) {
            Ok(id) => {
                let now = Instant::now();
                self.running.insert(
                    id,
                    Running {
                        events: job.events,
                        pending: Vec::new(),
                        full_since: None,
                        prompt_bytes: job.prompt.len(),
                        generated: 0,
                        queued: now.duration_since(job.queued_at),
                        admitted_at: now,
                        finished: None,
                    },
                );
                let active = self.decoder.active();
                self.stats.peak_batch.fetch_max(active, Ordering::SeqCst);
                self.report_active();
            }
            Err(e) => {
                // The request's own fault (a prompt byte outside the vocabulary) or the decoder's.
                let kind = match e {
                    crate::Error::Config(_) => FailureKind::Invalid,
                    _ => FailureKind::Compute,
                };
                count_outcome(if kind == FailureKind::Invalid {
                    "rejected"
                } else {
                    "error"
                });
                let _ = job.events.try_send(Event::Failed(Failure::new(kind, e.to_string())));
            }
        }
    }

    /// One decoder step, its bytes handed out.
    fn step(&mut self) {
        let size = self.decoder.active();
        let started = Instant::now();
        self.stats.set_step_started(Some(started));
        let stats = &self.stats;
        let stepped = self
            .decoder
            .step_isolating(&mut || stats.set_step_started(Some(Instant::now())));
        self.stats.set_step_started(None);
        let emitted = match stepped {
            Ok(outcome) => {
                let nothing_stepped = outcome.emitted.is_empty();
                if let Some(failure) = self.fail_alone(outcome.failed) {
                    if nothing_stepped {
                        // Every sequence failed: the server is failing as when the batch failed.
                        self.stats.set_last_error(Some(failure));
                        self.report_active();
                        return;
                    }
                }
                outcome.emitted
            }
            Err(e) => {
                // The decoder's state is unknown after a failed step: stop what it held.
                let message = format!("generation failed: {e}");
                self.stats.set_last_error(Some(message.clone()));
                self.note_broken();
                let ids: Vec<SeqId> = self.running.keys().copied().collect();
                for id in ids {
                    self.decoder.cancel(id);
                    if let Some(r) = self.running.remove(&id) {
                        count_outcome("error");
                        let _ = r
                            .events
                            .try_send(Event::Failed(Failure::new(FailureKind::Compute, message.clone())));
                    }
                }
                self.report_active();
                return;
            }
        };
        self.stats.set_last_error(None);
        metrics::histogram!(names::SERVE_STEP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(names::SERVE_BATCH_SIZE).record(size as f64);
        metrics::counter!(names::SERVE_GENERATED_BYTES).increment(emitted.len() as u64);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .generated_bytes
            .fetch_add(emitted.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        for e in emitted {
            let Some(r) = self.running.get_mut(&e.id) else {
                continue;
            };
            r.pending.push(e.byte);
            r.generated += 1;
            if e.finished {
                if let Some(mut r) = self.running.remove(&e.id) {
                    r.finished = Some(Finished {
                        prompt_bytes: r.prompt_bytes,
                        generated_bytes: r.generated,
                        queued: r.queued,
                        generating: now.duration_since(r.admitted_at),
                    });
                    self.draining.push(r);
                }
            }
        }
        self.report_active();
    }

    /// Stop the sequences that failed on their own in a step (the others went on): each request
    /// gets its error. Returns the last failure's message, if any sequence failed.
    fn fail_alone(&mut self, failed: Vec<(SeqId, crate::Error)>) -> Option<String> {
        let mut last = None;
        for (id, e) in failed {
            let message = format!("generation failed: {e}");
            if let Some(r) = self.running.remove(&id) {
                count_outcome("error");
                let _ = r
                    .events
                    .try_send(Event::Failed(Failure::new(FailureKind::Compute, message.clone())));
            }
            last = Some(message);
        }
        if last.is_some() {
            self.note_broken();
        }
        last
    }

    /// Keep the decoder's lasting failure ([`Decode::broken`]), if it has one, for `/health`.
    fn note_broken(&self) {
        if let Some(why) = self.decoder.broken() {
            self.stats
                .broken
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(why);
        }
    }

    /// Hand out what every sequence has pending; cancel those whose client is gone or stalled.
    fn deliver_all(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, r) in self.running.iter_mut() {
            if let Delivery::Gone(outcome) = r.deliver(self.client_timeout, now) {
                gone.push((id, outcome));
            }
        }
        for (id, outcome) in gone {
            self.decoder.cancel(id);
            self.running.remove(&id);
            count_outcome(outcome);
        }
        let timeout = self.client_timeout;
        self.draining.retain_mut(|r| match r.deliver(timeout, now) {
            Delivery::Sent => {
                count_outcome("ok");
                false
            }
            Delivery::Waiting => true,
            Delivery::Gone(outcome) => {
                count_outcome(outcome);
                false
            }
        });
        self.report_active();
    }

    /// Fail every request, running or queued (the server is shutting down).
    fn fail_all(&mut self, message: &str) {
        let failed = || Event::Failed(Failure::new(FailureKind::Shutdown, message));
        for (id, r) in self.running.drain() {
            self.decoder.cancel(id);
            count_outcome("shutdown");
            let _ = r.events.try_send(failed());
        }
        for r in self.draining.drain(..) {
            count_outcome("shutdown");
            let _ = r.events.try_send(failed());
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.waiting.push_back(job);
        }
        for job in self.waiting.drain(..) {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            metrics::gauge!(names::SERVE_QUEUED).decrement(1.0);
            count_outcome("shutdown");
            let _ = job.events.try_send(failed());
        }
        self.report_active();
    }

    /// Bring the active count (shared figures and gauge) up to date.
    fn report_active(&mut self) {
        let active = self.decoder.active();
        self.stats.active.store(active, Ordering::SeqCst);
        if active != self.reported_active {
            metrics::gauge!(names::SERVE_ACTIVE).increment(active as f64 - self.reported_active as f64);
            self.reported_active = active;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that has run past the limit is reported with how long it has run; none between
    /// steps, nor within the limit.
    #[test]
    fn a_step_running_past_the_limit_is_stalled() {
        let stats = Stats::default();
        assert_eq!(stats.stalled(Duration::ZERO), None, "no step runs");
        stats.set_step_started(Some(Instant::now()));
        assert_eq!(stats.stalled(Duration::from_secs(60)), None, "a step just begun");
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(200))
            .expect("an instant 200 s back");
        stats.set_step_started(Some(long_ago));
        let ran = stats.stalled(Duration::from_secs(100)).expect("stalled");
        assert!(ran >= Duration::from_secs(200), "{ran:?}");
        stats.set_step_started(None);
        assert_eq!(stats.stalled(Duration::ZERO), None, "the step ended");
    }
}
