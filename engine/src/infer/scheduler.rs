//! Continuous batching: one inference thread owns the model and, every step, runs all active
//! sequences together: one token for each decoding sequence plus prompt chunks for new ones,
//! within a token budget. New requests join at the next step; finished or abandoned ones
//! leave at once. The HTTP side talks to it only through bounded channels.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use super::models::llama::{BatchItem, LlamaModel, SeqCache, log_softmax};
use super::prefix::PrefixCache;
use super::sampler::{Sampler, SamplingParams};
use crate::metrics::Metrics;
use crate::model::ModelInfo;
use crate::model::tokenizer::Detokenizer;

/// Most alternatives a request may ask for per position (OpenAI's `top_logprobs` maximum).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Capacity of a request's event channel: one event per generated token plus the final one,
/// so the inference thread never blocks on (or drops events for) a client that reads slowly.
pub fn event_capacity(max_tokens: usize) -> usize {
    max_tokens + 2
}

#[derive(Debug)]
pub struct GenRequest {
    pub request_id: String,
    /// Who may share this prompt's cached prefixes (the API key's name; see `infer::prefix`).
    pub prefix_scope: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(n)`: report the chosen token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    pub events: mpsc::Sender<Event>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty while a character or a stop sequence is incomplete) and the
    /// tokens it came from, when logprobs were asked for.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
        /// Tokens generated since the previous Delta (their text may still be held back).
        tokens: usize,
    },
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The step failed; the cause is in the server log.
    Failed,
    /// A pipeline stage on another node is down: the request cannot complete now (503).
    Unavailable,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: the caller answers 503 with Retry-After.
    QueueFull,
    /// The pipeline is down (a stage is unreachable): 503 until it is back.
    Unavailable,
}

#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<GenRequest>,
    metrics: Arc<Metrics>,
    available: Arc<AtomicBool>,
}

impl SchedulerHandle {
    /// Whether requests can run now (`false` while a pipeline stage is down).
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if !self.available.load(Ordering::Relaxed) {
            return Err(SubmitError::Unavailable);
        }
        self.tx.try_send(req).map_err(|_| SubmitError::QueueFull)?;
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One sequence's part of a step, as the scheduler hands it to a [`StepRunner`].
pub struct StepItem<'a> {
    /// The sequence's id, unique for the life of the process (stages key their caches by it).
    pub seq: u64,
    pub tokens: &'a [u32],
    /// This node's cache for the sequence (its length is the sequence's position).
    pub cache: &'a mut SeqCache,
}

/// A step failed because a pipeline stage is unreachable, not because of the request.
#[derive(Debug)]
pub struct StageDown;

impl std::fmt::Display for StageDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a pipeline stage is down")
    }
}

impl std::error::Error for StageDown {}

/// Where a step's compute runs: the whole model on this node, or this node's first stage
/// followed by stages on other nodes (`cluster::pipeline`). Called on the inference thread,
/// which may not touch the network: a remote runner talks to its link threads by channel.
pub trait StepRunner: Send {
    /// This node's part of the model (it makes the sequences' caches).
    fn local(&self) -> &LlamaModel;
    /// Run one step; the next-token logits of each item's last row, in order. An error that
    /// wraps [`StageDown`] means every sequence in flight is lost.
    fn run(&mut self, items: &mut [StepItem<'_>]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// The sequence is finished or abandoned: free its state on every stage.
    fn free(&mut self, seq: u64);
    /// Whether a step can run now (`false` while a stage is down).
    fn available(&self) -> Arc<AtomicBool>;
}

/// A runner without a model, never available: requests are routed, validated, rendered and
/// tokenized for real, then answered 503 (`SchedulerHandle::submit` refuses them while the
/// runner is unavailable). For the router tests and the
/// fuzz targets, which need everything in front of the model and nothing of it.
pub struct NoModel;

impl StepRunner for NoModel {
    fn local(&self) -> &LlamaModel {
        unreachable!("the scheduler answers before asking an unavailable runner for its model")
    }
    fn run(&mut self, _items: &mut [StepItem<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::bail!("no model is loaded")
    }
    fn free(&mut self, _seq: u64) {}
    fn available(&self) -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }
}

/// The model's view of a step's items (it needs no sequence ids).
pub fn as_batch<'a>(items: &'a mut [StepItem<'_>]) -> Vec<BatchItem<'a>> {
    items
        .iter_mut()
        .map(|it| BatchItem {
            tokens: it.tokens,
            cache: &mut *it.cache,
        })
        .collect()
}

impl StepRunner for LlamaModel {
    fn local(&self) -> &LlamaModel {
        self
    }
    fn run(&mut self, items: &mut [StepItem<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let model = &*self;
        on_compute_pool(|| model.forward(&mut as_batch(items)))
    }
    fn free(&mut self, _seq: u64) {}
    fn available(&self) -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(true))
    }
}

pub struct SchedulerConfig {
    pub max_batch: usize,
    pub max_batch_tokens: usize,
    pub queue_depth: usize,
    /// Budget of the prompt prefix cache; 0 turns reuse off.
    pub prefix_cache_bytes: usize,
}

/// The inference thread, started before the model exists: it confines itself, creates the
/// compute pools (so that their threads inherit its confinement), then waits for the model.
pub struct Pending {
    handle: SchedulerHandle,
    join: std::thread::JoinHandle<()>,
    model_tx: std::sync::mpsc::SyncSender<(Box<dyn StepRunner>, Arc<ModelInfo>)>,
}

impl Pending {
    /// Hand the loaded model over; the thread starts serving the queue.
    pub fn start(
        self,
        runner: Box<dyn StepRunner>,
        info: Arc<ModelInfo>,
    ) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
        let mut handle = self.handle;
        handle.available = runner.available();
        self.model_tx.send((runner, info)).map_err(|_| {
            std::io::Error::other("the inference thread ended before the model arrived")
        })?;
        Ok((handle, self.join))
    }
}

/// Make the calling thread the one that computes: stack the compute filter on it, then create
/// the compute pools, which inherit it. Called first thing on the inference thread (and on a
/// cluster worker's stage thread).
pub fn enter_compute_thread(
    compute_filter: Option<sandbox::ComputeFilter>,
    compute_threads: usize,
) -> Result<(), String> {
    // INVARIANT: the compute allowlist (no network calls) is stacked before this thread
    // starts the compute pools, which inherit it, and before it touches a request.
    if let Some(f) = compute_filter {
        f.apply_to_current_thread()
            .map_err(|e| format!("confining the inference thread: {e}"))?;
    }
    // INVARIANT: both compute pools are created here, by this thread, and never by another:
    // rayon's (GEMM) and candle's own persistent barrier pool.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(compute_threads)
        .thread_name(|i| format!("bulwark-compute-{i}"))
        .build_global()
    {
        tracing::debug!(error = %e, "compute pool already exists");
    }
    let _ = candle_core::utils::barrier_pool();
    Ok(())
}

/// Runs `f` (the computation of one step) on a thread of the compute pool while the calling
/// thread waits. The parallel loops `f` starts then share work with the pool's other threads
/// by work stealing; started from outside the pool, every loop would instead wake the pool
/// and put the caller to sleep until it finished: two context switches per loop, and a
/// decode step has about 150 loops. Only computation: a pool thread blocked waiting (for
/// requests, or for a pipeline stage's answer) leaves the pool a thread short, and in a
/// process with several schedulers (the tests, a pipeline in one process) with none.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `scope` runs its closure on a worker of the (global) pool: rayon has no `install` for
    // the global pool, and this is how to enter it.
    rayon::scope(|_| f())
}

/// Start the inference thread. Returns once its compute pools exist, so that work the caller
/// runs afterwards (loading the model) uses threads that inherit the thread's confinement.
pub fn spawn(
    cfg: SchedulerConfig,
    compute_threads: usize,
    metrics: Arc<Metrics>,
    compute_filter: Option<sandbox::ComputeFilter>,
) -> std::io::Result<Pending> {
    let (tx, rx) = mpsc::channel(cfg.queue_depth);
    let (model_tx, model_rx) =
        std::sync::mpsc::sync_channel::<(Box<dyn StepRunner>, Arc<ModelInfo>)>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let m = metrics.clone();
    let join = std::thread::Builder::new()
        .name("bulwark-infer".into())
        .spawn(move || {
            if let Err(e) = enter_compute_thread(compute_filter, compute_threads) {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            let Ok((runner, info)) = model_rx.recv() else {
                return;
            };
            Scheduler {
                prefixes: PrefixCache::new(cfg.prefix_cache_bytes),
                runner,
                info,
                cfg,
                metrics: m,
                active: Vec::new(),
                next_seq: 1,
            }
            .run(rx)
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(std::io::Error::other(e)),
        Err(_) => {
            return Err(std::io::Error::other(
                "the inference thread ended during start-up",
            ));
        }
    }
    Ok(Pending {
        handle: SchedulerHandle {
            tx,
            metrics,
            // Replaced by the runner's own flag when the model arrives.
            available: Arc::new(AtomicBool::new(true)),
        },
        join,
        model_tx,
    })
}

struct Active {
    req: GenRequest,
    seq: u64,
    cache: SeqCache,
    sampler: Sampler,
    detok: Detokenizer,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The token to feed next while decoding.
    last: [u32; 1],
    generated: usize,
    /// Tokens generated but not yet counted in a Delta.
    unreported: usize,
    pending_text: String,
    pending_logprobs: Vec<TokenLogprob>,
    started: Instant,
}

struct Scheduler {
    runner: Box<dyn StepRunner>,
    info: Arc<ModelInfo>,
    cfg: SchedulerConfig,
    metrics: Arc<Metrics>,
    active: Vec<Active>,
    next_seq: u64,
    prefixes: PrefixCache,
}

impl Scheduler {
    fn run(mut self, mut rx: mpsc::Receiver<GenRequest>) {
        loop {
            if self.active.is_empty() {
                match rx.blocking_recv() {
                    Some(r) => self.admit(r),
                    None => return,
                }
            }
            while self.active.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(r) => self.admit(r),
                    Err(_) => break,
                }
            }
            // A client that went away frees its slot before the next step.
            let before = self.active.len();
            let runner = &mut self.runner;
            self.active.retain(|a| {
                let keep = !a.req.events.is_closed();
                if !keep {
                    runner.free(a.seq);
                }
                keep
            });
            let gone = before - self.active.len();
            if gone > 0 {
                self.metrics
                    .cancelled
                    .fetch_add(gone as u64, Ordering::Relaxed);
            }
            self.metrics
                .active
                .store(self.active.len() as u64, Ordering::Relaxed);
            if !self.active.is_empty() {
                self.step();
                // Also after the step: the loop may now sleep on an empty queue, and the gauge
                // must not keep the last step's value while idle.
                self.metrics
                    .active
                    .store(self.active.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn admit(&mut self, req: GenRequest) {
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        if !self.runner.available().load(Ordering::Relaxed) {
            let _ = req.events.try_send(Event::Unavailable);
            return;
        }
        let sampler = Sampler::new(req.sampling.clone());
        let seq = self.next_seq;
        self.next_seq += 1;
        let (cache, prefilled) = self.reuse_prefix(&req);
        self.active.push(Active {
            seq,
            cache,
            sampler,
            detok: Detokenizer::new(),
            prefilled,
            last: [0],
            generated: 0,
            unreported: 0,
            pending_text: String::new(),
            pending_logprobs: Vec::new(),
            started: Instant::now(),
            req,
        });
    }

    /// A cache for `req`, holding the longest prefix of its prompt cached for its scope, and
    /// that prefix's length (the prompt tokens already in the cache).
    fn reuse_prefix(&mut self, req: &GenRequest) -> (SeqCache, usize) {
        let model = self.runner.local();
        if let Some((cache, n)) = self.prefixes.take(model, &req.prefix_scope, &req.prompt) {
            self.metrics
                .prefix_reused_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            return (cache, n);
        }
        (model.new_cache(), 0)
    }

    /// Which sequences run this step and with how many tokens, in `active` order: decoding
    /// sequences first (one token each), then prompt chunks in the remaining budget.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut budget = self.cfg.max_batch_tokens.max(self.active.len());
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index into active, tokens this step)
        for (i, a) in self.active.iter().enumerate() {
            if a.prefilled == a.req.prompt.len() {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, a) in self.active.iter().enumerate() {
            let left = a.req.prompt.len() - a.prefilled;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        plan.sort_unstable();
        plan
    }

    /// A step failed: a stage down fails every sequence in flight (their caches are gone with
    /// the connection); any other error fails the sequences of the step.
    fn fail_step(&mut self, e: &anyhow::Error, plan: &[(usize, usize)]) {
        if e.chain().any(|c| c.is::<StageDown>()) {
            tracing::warn!(error = %format!("{e:#}"), in_flight = self.active.len(),
                "pipeline stage down: failing every sequence in flight");
            for a in self.active.drain(..) {
                let _ = a.req.events.try_send(Event::Unavailable);
            }
            return;
        }
        tracing::error!(error = %format!("{e:#}"), "inference step failed");
        for &(i, _) in plan {
            let _ = self.active[i].req.events.try_send(Event::Failed);
            self.runner.free(self.active[i].seq);
        }
        let failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
        let mut idx = 0;
        self.active.retain(|_| {
            idx += 1;
            !failed.contains(&(idx - 1))
        });
    }

    fn step(&mut self) {
        let plan = self.plan();
        self.metrics
            .peak_batch
            .fetch_max(plan.len() as u64, Ordering::Relaxed);
        let mut planned = plan.iter().peekable();
        let mut items: Vec<StepItem<'_>> = Vec::with_capacity(plan.len());
        for (i, a) in self.active.iter_mut().enumerate() {
            let Some(&(_, n)) = planned.next_if(|(j, _)| *j == i) else {
                continue;
            };
            let tokens: &[u32] = if a.prefilled < a.req.prompt.len() {
                &a.req.prompt[a.prefilled..a.prefilled + n]
            } else {
                &a.last
            };
            items.push(StepItem {
                seq: a.seq,
                tokens,
                cache: &mut a.cache,
            });
        }
        let result = self.runner.run(&mut items);
        drop(items);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.fail_step(&e, &plan);
                return;
            }
        };

        let mut finished = Vec::new();
        for (&(i, n), row) in plan.iter().zip(logits) {
            let a = &mut self.active[i];
            let prefilling = a.prefilled < a.req.prompt.len();
            if prefilling {
                a.prefilled += n;
                self.metrics
                    .prompt_tokens
                    .fetch_add(n as u64, Ordering::Relaxed);
                if a.prefilled < a.req.prompt.len() {
                    continue; // more prompt to go: these logits are not a prediction we need
                }
                let ttft = a.started.elapsed();
                self.metrics.observe_ttft(ttft);
                let model = self.runner.local();
                self.prefixes
                    .put(model, &a.req.prefix_scope, &a.req.prompt, &a.cache);
            }
            if let Some(reason) = self.emit_token(i, &row) {
                finished.push((i, reason));
            }
        }
        for &(i, reason) in finished.iter().rev() {
            let a = self.active.swap_remove(i);
            self.finish(a, reason);
        }
    }

    /// Sample the next token of sequence `i`; returns a finish reason when it is done.
    fn emit_token(&mut self, i: usize, logits: &[f32]) -> Option<FinishReason> {
        let tok = &self.info.tokenizer;
        let a = &mut self.active[i];
        let id = a.sampler.sample(logits);
        a.generated += 1;
        a.unreported += 1;
        a.last = [id];
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);

        // The stop token ends the answer; it is not part of it (nor of its logprobs).
        if tok.stop_ids.contains(&id) {
            return Some(FinishReason::Stop);
        }
        if let Some(n) = a.req.logprobs {
            a.pending_logprobs.push(token_logprob(tok, logits, id, n));
        }

        let delta = a.detok.push(tok, id);
        a.pending_text.push_str(&delta);

        // Stop sequences: cut at the first match; hold back a tail that could start one.
        if let Some(pos) = a
            .req
            .stop
            .iter()
            .filter_map(|s| a.pending_text.find(s.as_str()))
            .min()
        {
            a.pending_text.truncate(pos);
            return Some(FinishReason::Stop);
        }
        let hold = a
            .req
            .stop
            .iter()
            .map(|s| longest_suffix_prefix(&a.pending_text, s))
            .max()
            .unwrap_or(0);
        if a.generated >= a.req.max_tokens {
            return Some(FinishReason::Length);
        }
        let release = a.pending_text.len() - hold;
        if release > 0 || !a.pending_logprobs.is_empty() {
            let text: String = a.pending_text.drain(..release).collect();
            let logprobs = std::mem::take(&mut a.pending_logprobs);
            let tokens = std::mem::take(&mut a.unreported);
            if a.req
                .events
                .try_send(Event::Delta {
                    text,
                    logprobs,
                    tokens,
                })
                .is_err()
            {
                // Receiver gone (client left); the next step's sweep frees the slot.
            }
        }
        None
    }

    fn finish(&mut self, mut a: Active, finish: FinishReason) {
        self.runner.free(a.seq);
        // A generation cut inside a character (max_tokens) keeps the bytes it counted. After
        // a stop sequence, the text was already cut where the sequence starts.
        if finish == FinishReason::Length {
            let rest = a.detok.flush(&self.info.tokenizer);
            a.pending_text.push_str(&rest);
        }
        let text = std::mem::take(&mut a.pending_text);
        let logprobs = std::mem::take(&mut a.pending_logprobs);
        let tokens = std::mem::take(&mut a.unreported);
        if !text.is_empty() || !logprobs.is_empty() || tokens > 0 {
            let _ = a.req.events.try_send(Event::Delta {
                text,
                logprobs,
                tokens,
            });
        }
        let _ = a.req.events.try_send(Event::Done {
            finish,
            prompt_tokens: a.req.prompt.len(),
            completion_tokens: a.generated,
        });
        self.metrics.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The chosen token's logprob and the `n` most likely alternatives (at most
/// [`MAX_TOP_LOGPROBS`]), found without sorting the whole vocabulary.
fn token_logprob(
    tok: &crate::model::tokenizer::ModelTokenizer,
    logits: &[f32],
    id: u32,
    n: usize,
) -> TokenLogprob {
    let lp = log_softmax(logits);
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = n.min(MAX_TOP_LOGPROBS);
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&x, &y| lp[y as usize].total_cmp(&lp[x as usize]));
        order.truncate(k);
        order.sort_by(|&x, &y| lp[y as usize].total_cmp(&lp[x as usize]));
    } else {
        order.clear();
    }
    TokenLogprob {
        id,
        token: tok.token_text(id),
        bytes: tok.token_bytes(id),
        logprob: lp[id as usize],
        top: order
            .iter()
            .map(|&t| TopLogprob {
                token: tok.token_text(t),
                bytes: tok.token_bytes(t),
                logprob: lp[t as usize],
            })
            .collect(),
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_partial_stop_sequence() {
        assert_eq!(longest_suffix_prefix("hello wor", "world"), 3);
        assert_eq!(longest_suffix_prefix("hello", "world"), 0);
        assert_eq!(longest_suffix_prefix("abc\n\n", "\n\nUser:"), 2);
        assert_eq!(longest_suffix_prefix("ü", "üx"), 2);
    }
}
