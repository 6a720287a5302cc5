//! The batched engine behind `tern serve` and batch files: continuous batching of many
//! sequences, each with its own adapter and sampling settings.
//!
//! One worker thread owns every sequence's KV cache. At each step boundary it drops rows
//! whose caller went away, admits waiting requests (running their prompts) while batch slots
//! are free, then decodes one token for every running row in a single
//! [`crate::model::Model::decode_rows`] call, so each weight is read once per step for the
//! whole batch. Callers talk to it through [`Engine::submit`] and a [`TokenSink`].

use super::prefix_cache::PrefixCache;
use super::{GenStats, GenerateRequest, Sequence, StreamToken};
use crate::error::{Result, TernError};
use crate::lora::BatchAdapters;
use crate::model::{Cache, LoadedModel};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the engine tells a request's owner.
#[derive(Debug)]
pub enum EngineEvent {
    /// The next token; the last one carries a finish reason.
    Token(StreamToken),
    /// The request finished normally (sent after its last token).
    Done(GenStats),
    /// The request failed or was cancelled; nothing more follows.
    Failed(TernError),
}

/// Where a request's events go. Returning `false` from `send`, or `true` from `is_closed`,
/// means the receiver is gone: the row is freed at the next step boundary.
pub trait TokenSink: Send + 'static {
    /// Delivers one event; `false` if nobody is listening any more.
    fn send(&mut self, ev: EngineEvent) -> bool;
    /// Whether the receiver has gone away (checked before spending work on the request).
    fn is_closed(&self) -> bool {
        false
    }
}

impl TokenSink for mpsc::Sender<EngineEvent> {
    fn send(&mut self, ev: EngineEvent) -> bool {
        mpsc::Sender::send(self, ev).is_ok()
    }
}

/// One engine step, as reported to [`EngineConfig::on_step`].
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Rows decoded together in this step (0 if the step only ran prompts).
    pub rows: usize,
    /// Prompt tokens run in this step.
    pub prefill_tokens: usize,
    /// Wall time of the step's prompts (admission, prefill and their first tokens).
    pub prefill: Duration,
    /// Wall time of the step.
    pub duration: Duration,
}

/// Observer called after each step (e.g. to feed a metrics histogram).
pub type StepObserver = Arc<dyn Fn(StepInfo) + Send + Sync>;

/// Batching limits.
#[derive(Clone)]
pub struct EngineConfig {
    /// Most rows decoded together.
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more are refused with [`TernError::Busy`].
    pub max_queue: usize,
    /// Prompt tokens run per step boundary before decoding resumes (at least one request
    /// is always admitted when a slot is free), so long prompts do not stall running rows
    /// for many prompts at once.
    pub prefill_budget: usize,
    /// Called after every step.
    pub on_step: Option<StepObserver>,
    /// Bytes of KV cache kept for prompt prefixes already run (0: no prefix caching).
    pub prefix_cache_bytes: usize,
    /// Shortest prefix worth storing and reusing, in tokens.
    pub prefix_min_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            prefill_budget: 512,
            on_step: None,
            prefix_cache_bytes: 256 << 20,
            prefix_min_tokens: 32,
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("max_batch", &self.max_batch)
            .field("max_queue", &self.max_queue)
            .field("prefill_budget", &self.prefill_budget)
            .field("prefix_cache_bytes", &self.prefix_cache_bytes)
            .field("prefix_min_tokens", &self.prefix_min_tokens)
            .finish()
    }
}

/// Counters read at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting for a batch slot.
    pub queued: usize,
    /// Rows in the running batch.
    pub running: usize,
    /// Requests that finished normally.
    pub completed: u64,
    /// Requests that failed, were cancelled, or whose caller went away.
    pub aborted: u64,
    /// Prompt tokens run.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Decode steps run.
    pub steps: u64,
    /// Requests whose prompt started with a cached prefix.
    pub prefix_hits: u64,
    /// Prompt tokens taken from the prefix cache instead of being run.
    pub prefix_tokens: u64,
}

#[derive(Default)]
struct Shared {
    queued: AtomicUsize,
    running: AtomicUsize,
    accepting: AtomicBool,
    completed: AtomicU64,
    aborted: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    steps: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_tokens: AtomicU64,
}

struct Pending {
    req: GenerateRequest,
    sink: Box<dyn TokenSink>,
}

enum Cmd {
    Submit(Box<Pending>),
    Shutdown(Instant),
}

/// A running engine; dropping it cancels what is left and joins the worker.
pub struct Engine {
    lm: Arc<LoadedModel>,
    cfg: EngineConfig,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Engine {
    /// Starts the worker thread.
    pub fn start(lm: Arc<LoadedModel>, cfg: EngineConfig) -> Result<Self> {
        if cfg.max_batch == 0 {
            return Err(TernError::InvalidArgument(
                "max_batch must be at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared::default());
        shared.accepting.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            lm: lm.clone(),
            cfg: cfg.clone(),
            shared: shared.clone(),
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            deadline: None,
            prefix: PrefixCache::new(cfg.prefix_cache_bytes, cfg.prefix_min_tokens),
        };
        let handle = std::thread::Builder::new()
            .name("tern-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| TernError::InvalidArgument(format!("cannot start the engine: {e}")))?;
        Ok(Self {
            lm,
            cfg,
            tx: Mutex::new(Some(tx)),
            shared,
            worker: Mutex::new(Some(handle)),
        })
    }

    /// The model it runs.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.lm
    }

    /// Its limits.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Queues a request. Invalid requests, a full queue ([`TernError::Busy`]) and a shutting
    /// down engine are refused here, before anything is queued; afterwards every outcome
    /// arrives at `sink`.
    pub fn submit(&self, req: GenerateRequest, sink: impl TokenSink) -> Result<()> {
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(TernError::ShuttingDown);
        }
        req.validate(&self.lm)?;
        let free = self
            .cfg
            .max_batch
            .saturating_sub(self.shared.running.load(Ordering::SeqCst));
        let queued = self.shared.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= self.cfg.max_queue + free {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(TernError::Busy {
                queued,
                limit: self.cfg.max_queue,
            });
        }
        let cmd = Cmd::Submit(Box::new(Pending {
            req,
            sink: Box::new(sink),
        }));
        let sent = match self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(tx) => tx.send(cmd).is_ok(),
            None => false,
        };
        if !sent {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(TernError::ShuttingDown);
        }
        Ok(())
    }

    /// Queues a request and returns a channel of its events.
    pub fn submit_channel(&self, req: GenerateRequest) -> Result<mpsc::Receiver<EngineEvent>> {
        let (tx, rx) = mpsc::channel();
        self.submit(req, tx)?;
        Ok(rx)
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            queued: s.queued.load(Ordering::SeqCst),
            running: s.running.load(Ordering::SeqCst),
            completed: s.completed.load(Ordering::SeqCst),
            aborted: s.aborted.load(Ordering::SeqCst),
            prompt_tokens: s.prompt_tokens.load(Ordering::SeqCst),
            generated_tokens: s.generated_tokens.load(Ordering::SeqCst),
            steps: s.steps.load(Ordering::SeqCst),
            prefix_hits: s.prefix_hits.load(Ordering::SeqCst),
            prefix_tokens: s.prefix_tokens.load(Ordering::SeqCst),
        }
    }

    /// Stops taking requests, cancels those still waiting, lets running rows finish for up
    /// to `grace`, cancels the rest, and joins the worker. Idempotent.
    pub fn shutdown(&self, grace: Duration) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Cmd::Shutdown(Instant::now() + grace));
        }
        if let Some(h) = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

struct Row {
    seq: Sequence,
    sink: Box<dyn TokenSink>,
}

struct Worker {
    lm: Arc<LoadedModel>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    waiting: VecDeque<Pending>,
    running: Vec<Row>,
    deadline: Option<Instant>,
    prefix: PrefixCache,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.take_commands() {
                break;
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                let rows = std::mem::take(&mut self.running);
                for r in rows {
                    self.fail(
                        r.sink,
                        TernError::Cancelled("the server is shutting down".into()),
                    );
                }
                break;
            }
            let t = Instant::now();
            let prefill_tokens = self.admit();
            let prefill = t.elapsed();
            let rows = self.running.len();
            if rows > 0 {
                self.decode();
            }
            self.shared
                .running
                .store(self.running.len(), Ordering::SeqCst);
            if let Some(obs) = &self.cfg.on_step {
                obs(StepInfo {
                    rows,
                    prefill_tokens,
                    prefill,
                    duration: t.elapsed(),
                });
            }
        }
        self.shared.running.store(0, Ordering::SeqCst);
    }

    /// Takes queued commands, blocking when there is nothing to do. `false`: time to stop.
    fn take_commands(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            if self.deadline.is_some() {
                return false;
            }
            match self.rx.recv() {
                Ok(c) => self.handle(c),
                Err(_) => return false,
            }
        }
        while let Ok(c) = self.rx.try_recv() {
            self.handle(c);
        }
        !(self.deadline.is_some() && self.running.is_empty() && self.waiting.is_empty())
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Submit(p) => {
                if self.deadline.is_some() {
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    self.fail(p.sink, TernError::ShuttingDown);
                } else {
                    self.waiting.push_back(*p);
                }
            }
            Cmd::Shutdown(deadline) => {
                self.deadline = Some(deadline);
                // Requests that have not started are cancelled at once; only started rows
                // get the grace period.
                while let Some(p) = self.waiting.pop_front() {
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    self.fail(p.sink, TernError::ShuttingDown);
                }
            }
        }
    }

    fn fail(&self, mut sink: Box<dyn TokenSink>, e: TernError) {
        self.shared.aborted.fetch_add(1, Ordering::SeqCst);
        sink.send(EngineEvent::Failed(e));
    }

    /// Delivers a row's token; returns the row if it is still running.
    fn deliver(&self, mut row: Row, tok: Result<StreamToken>) -> Option<Row> {
        match tok {
            Err(e) => {
                self.fail(row.sink, e);
                None
            }
            Ok(t) => {
                self.shared.generated_tokens.fetch_add(1, Ordering::SeqCst);
                let done = t.finish_reason.is_some();
                if !row.sink.send(EngineEvent::Token(t)) {
                    self.shared.aborted.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
                if done {
                    self.shared.completed.fetch_add(1, Ordering::SeqCst);
                    row.sink.send(EngineEvent::Done(row.seq.stats()));
                    return None;
                }
                Some(row)
            }
        }
    }

    /// Takes waiting requests while batch slots and the step's prefill budget last and runs
    /// their prompts together (one pass over the weights for all of them).
    fn admit(&mut self) -> usize {
        let mut spent = 0;
        let mut batch: Vec<Row> = Vec::new();
        // Taken requests stay counted as queued until they are counted as running: `submit`
        // reads both counts, and a gap between them would let the queue overfill by a batch.
        let mut taken = 0;
        while self.running.len() + batch.len() < self.cfg.max_batch
            && (spent == 0 || spent < self.cfg.prefill_budget)
        {
            let Some(p) = self.waiting.pop_front() else {
                break;
            };
            taken += 1;
            if p.sink.is_closed() {
                self.shared.aborted.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            match self.start_sequence(p.req) {
                Ok(seq) => {
                    spent += seq.req.prompt_ids.len() - seq.cache.len();
                    batch.push(Row { seq, sink: p.sink });
                }
                Err(e) => self.fail(p.sink, e),
            }
        }
        if batch.is_empty() {
            self.shared.queued.fetch_sub(taken, Ordering::SeqCst);
            return 0;
        }
        self.shared
            .prompt_tokens
            .fetch_add(spent as u64, Ordering::SeqCst);
        let t = Instant::now();
        let lm = &self.lm;
        let out = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Vec<f32>>> {
            // Each row runs what its cache (empty, or a cached prefix) does not hold yet.
            let rest: Vec<Vec<u32>> = batch
                .iter()
                .map(|r| r.seq.req.prompt_ids[r.seq.cache.len()..].to_vec())
                .collect();
            let prompts: Vec<&[u32]> = rest.iter().map(Vec::as_slice).collect();
            let adapters: Vec<_> = batch.iter().map(|r| r.seq.req.adapter.clone()).collect();
            let mut refs: Vec<&mut Cache> = batch.iter_mut().map(|r| &mut r.seq.cache).collect();
            Ok(lm
                .model
                .prefill_rows(&prompts, &mut refs, &adapters)?
                .to_vec2::<f32>()?)
        }))
        .unwrap_or_else(|p| Err(TernError::InvalidArgument(panic_message(p))));
        self.settle(batch, out, "prefill", |w, r| {
            r.seq.prefilled(t);
            // The cache holds exactly the prompt now: keep it for later requests.
            let (req, cache) = (&r.seq.req, &r.seq.cache);
            if let Err(e) = w.prefix.insert(&req.adapter, &req.prompt_ids, cache) {
                tracing::warn!("prefix cache: {e}");
            }
        });
        self.shared
            .running
            .store(self.running.len(), Ordering::SeqCst);
        self.shared.queued.fetch_sub(taken, Ordering::SeqCst);
        spent
    }

    /// Hands each row its logits (after `prepare`) and keeps those still running, or fails
    /// every row with the step's error.
    fn settle(
        &mut self,
        rows: Vec<Row>,
        out: Result<Vec<Vec<f32>>>,
        step: &str,
        mut prepare: impl FnMut(&mut Self, &mut Row),
    ) {
        match out {
            Err(e) => {
                let msg = e.to_string();
                for r in rows {
                    self.fail(
                        r.sink,
                        TernError::InvalidArgument(format!("{step} failed: {msg}")),
                    );
                }
            }
            Ok(logits) => {
                for (mut r, l) in rows.into_iter().zip(logits) {
                    prepare(self, &mut r);
                    let tok = r.seq.accept(&self.lm, &l);
                    if let Some(r) = self.deliver(r, tok) {
                        self.running.push(r);
                    }
                }
            }
        }
    }

    /// A validated sequence whose cache starts from the longest cached prefix of its prompt.
    fn start_sequence(&mut self, req: GenerateRequest) -> Result<Sequence> {
        match self.prefix.lookup(&req.adapter, &req.prompt_ids)? {
            Some(c) => {
                self.shared.prefix_hits.fetch_add(1, Ordering::SeqCst);
                self.shared
                    .prefix_tokens
                    .fetch_add(c.len() as u64, Ordering::SeqCst);
                Sequence::resume(&self.lm, req, c)
            }
            None => Sequence::new(&self.lm, req),
        }
    }

    /// One decode step for every running row.
    fn decode(&mut self) {
        self.running.retain(|r| {
            let keep = !r.sink.is_closed();
            if !keep {
                self.shared.aborted.fetch_add(1, Ordering::SeqCst);
            }
            keep
        });
        if self.running.is_empty() {
            return;
        }
        let t = Instant::now();
        let lm = &self.lm;
        let rows = &mut self.running;
        let out = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Vec<f32>>> {
            let ids: Vec<u32> = rows.iter().filter_map(|r| r.seq.next_input()).collect();
            let adapters: Vec<_> = rows.iter().map(|r| r.seq.req.adapter.clone()).collect();
            let ad = BatchAdapters::per_row(&adapters, lm.model.device())?;
            let mut caches: Vec<&mut Cache> = rows.iter_mut().map(|r| &mut r.seq.cache).collect();
            Ok(lm
                .model
                .decode_rows(&ids, &mut caches, &ad)?
                .to_vec2::<f32>()?)
        }))
        .unwrap_or_else(|p| Err(TernError::InvalidArgument(panic_message(p))));
        self.shared.steps.fetch_add(1, Ordering::SeqCst);
        let rows = std::mem::take(&mut self.running);
        let d = t.elapsed();
        self.settle(rows, out, "decode step", |_, r| r.seq.add_decode_time(d));
    }
}
