//! A worker: one range of layers for the one head it accepts, and no API.
//!
//! Start-up order (each step fails closed): read the cluster identity; open the model file;
//! bind the cluster (and metrics) listeners; confine the process (no path, no new port, no
//! outgoing connection); start the stage thread (compute filter, compute pools) and load the
//! stage's layers, confined; then accept.
//!
//! A connection is accepted only from the head's configured address, only while no other
//! session is active, and only if its certificate chains to the cluster CA (the TLS handshake)
//! and carries the head's name (checked right after it). The Hello exchange then confirms the
//! protocol, the model's SHA-256, the layers, the dtype and the limits; any mismatch is refused
//! by name. Each session starts with no caches and drops them all when it ends.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};

use super::config::WorkerPeer;
use super::frame::{self, Hello, Kind, Step, StepOutput};
use crate::config::Config;
use crate::infer::models::llama::{LayerItem, LlamaModel, SeqCache, last_rows};
use crate::model::pin::OpenedModel;

/// Sequences a worker keeps caches for at once; the head frees finished ones, so more than
/// this means a misbehaving head.
pub const MAX_SEQUENCES: usize = 1024;
/// Steps queued between the session thread and the stage thread (one is in flight at a time).
const STAGE_QUEUE: usize = 4;

/// What the session thread asks of the stage thread.
enum Job {
    Step(Step, mpsc::SyncSender<Result<StepOutput>>),
    Free(Vec<u64>),
    /// A session ended: drop every cache.
    Reset,
}

pub fn run(cfg: &Config) -> Result<()> {
    let (peer, tls) = identity(cfg)?;
    let model_file = crate::serve::open_model(cfg)?;

    // INVARIANT: listeners are bound before confinement; afterwards no new port can be bound.
    let listener = TcpListener::bind(peer.listen)
        .with_context(|| format!("binding cluster.listen {}", peer.listen))?;
    let metrics_listener = crate::serve::bind_metrics(cfg)?;
    let notifier = crate::notify::Notifier::from_env();

    // INVARIANT: confined while single-threaded; every thread started below inherits it.
    let (status, compute_filter) = crate::confine::confine(cfg)?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    metrics
        .sandbox_enforced
        .store(u64::from(status.fully_enforced()), Ordering::Relaxed);
    crate::serve::spawn_metrics_thread(metrics_listener, metrics)?;

    let layers = cfg
        .cluster
        .as_ref()
        .map(|c| c.layer_range())
        .unwrap_or_default();
    let (jobs, hello) = spawn_stage_thread(cfg, model_file, layers.clone(), Some(compute_filter))?;
    tracing::info!(
        listen = %peer.listen,
        head = %peer.head_name,
        head_address = %peer.head_address,
        ?layers,
        last = hello.last,
        "worker serving"
    );
    notifier.ready();
    accept_loop(listener, &peer, tls, jobs, hello)
}

/// Serve a stage on `listener` from background threads, unconfined (for tests: confinement
/// cannot be undone in a test process).
pub fn spawn_unconfined(cfg: &Config, listener: TcpListener) -> Result<()> {
    let (peer, tls) = identity(cfg)?;
    let file = crate::serve::open_model(cfg)?;
    let layers = cfg
        .cluster
        .as_ref()
        .map(|c| c.layer_range())
        .unwrap_or_default();
    let (jobs, hello) = spawn_stage_thread(cfg, file, layers, None)?;
    std::thread::Builder::new()
        .name("bulwark-accept".into())
        .spawn(move || accept_loop(listener, &peer, tls, jobs, hello))?;
    Ok(())
}

/// The worker's peer (from the configuration) and its TLS server configuration.
fn identity(cfg: &Config) -> Result<(WorkerPeer, Arc<rustls::ServerConfig>)> {
    let cluster = cfg.cluster.as_ref().context("[cluster] is required")?;
    let peer = cluster
        .worker_peer()
        .context("cluster.listen, head_name and head_address are required for a worker")?;
    let identity = crate::tls::ClusterIdentity::load(
        &cfg.resolve(&cluster.ca),
        &cfg.resolve(&cluster.cert),
        &cfg.resolve(&cluster.key),
    )
    .context("loading the cluster certificate (cluster.ca, cluster.cert, cluster.key)")?;
    Ok((peer, Arc::new(identity.server_config()?)))
}

/// Start the stage thread (it stacks the compute filter on itself and creates the compute
/// pools), load the stage's layers here using those pools (the compute filter has no file
/// calls), and hand the model over. Returns the job queue and this stage's Hello.
fn spawn_stage_thread(
    cfg: &Config,
    file: OpenedModel,
    layers: std::ops::Range<usize>,
    compute_filter: Option<sandbox::ComputeFilter>,
) -> Result<(mpsc::SyncSender<Job>, Hello)> {
    let (tx, rx) = mpsc::sync_channel::<Job>(STAGE_QUEUE);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let (model_tx, model_rx) = mpsc::sync_channel::<(LlamaModel, bool)>(1);
    let threads = cfg.compute_threads();
    std::thread::Builder::new()
        .name("bulwark-stage".into())
        .spawn(move || {
            let entered = crate::infer::scheduler::enter_compute_thread(compute_filter, threads);
            let failed = entered.is_err();
            let _ = ready_tx.send(entered);
            if failed {
                return;
            }
            let Ok((model, last)) = model_rx.recv() else {
                return;
            };
            StageThread {
                model,
                last,
                caches: HashMap::new(),
            }
            .run(rx);
        })?;
    ready_rx
        .recv()
        .context("the stage thread ended during start-up")?
        .map_err(anyhow::Error::msg)?;
    let model = crate::infer::load::load_worker_stage(
        file,
        &cfg.model.pin(),
        layers.clone(),
        cfg.model.context_length,
        cfg.model.weights_on(&Device::Cpu),
        &Device::Cpu,
    )
    .context("loading the stage")?;
    let hello = super::hello_for(
        &model.cfg,
        &cfg.model.pin().identity(),
        layers,
        model.stage().head,
        super::max_step_rows(cfg.engine.max_batch_tokens, cfg.engine.max_batch),
        cfg.engine.max_batch,
    )?;
    model_tx
        .send((model, hello.last))
        .map_err(|_| anyhow::anyhow!("the stage thread ended before the model arrived"))?;
    Ok((tx, hello))
}

struct StageThread {
    model: LlamaModel,
    last: bool,
    caches: HashMap<u64, SeqCache>,
}

impl StageThread {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Step(step, reply) => {
                    let out = crate::infer::scheduler::on_compute_pool(|| self.step(step));
                    let _ = reply.send(out);
                }
                Job::Free(seqs) => {
                    for s in seqs {
                        self.caches.remove(&s);
                    }
                }
                Job::Reset => self.caches.clear(),
            }
        }
    }

    /// Run this stage's layers for a step. A sequence at position 0 starts a new cache; any
    /// other must continue exactly where its cache ends.
    fn step(&mut self, step: Step) -> Result<StepOutput> {
        let mut taken = Vec::with_capacity(step.items.len());
        for m in &step.items {
            let cache = match (m.position, self.caches.remove(&m.seq)) {
                (0, _) => self.model.new_cache(),
                (p, Some(c)) if c.len() == p as usize => c,
                (p, c) => {
                    // Put back what was taken, so that an error leaves the state as it was.
                    self.caches.extend(taken.drain(..).map(|(s, c, _)| (s, c)));
                    bail!(
                        "sequence {} at position {p}, but its cache holds {}",
                        m.seq,
                        c.map_or(0, |c| c.len())
                    );
                }
            };
            taken.push((m.seq, cache, m.rows as usize));
        }
        ensure!(
            self.caches.len() + taken.len() <= MAX_SEQUENCES,
            "more than {MAX_SEQUENCES} sequences held"
        );
        let rows = step.rows();
        let x = Tensor::from_vec(
            step.hidden,
            (rows, self.model.cfg.hidden),
            self.model.device(),
        )?;
        let mut items: Vec<LayerItem<'_>> = taken
            .iter_mut()
            .map(|(_, cache, rows)| LayerItem { rows: *rows, cache })
            .collect();
        let out = self.model.run_layers(x, &mut items);
        let (data, out_rows) = match out {
            Ok(x) if self.last => {
                let idx = last_rows(items.iter().map(|it| it.rows));
                let logits = self.model.logits(&x, &idx)?;
                (logits.concat(), idx.len())
            }
            Ok(x) => (x.flatten_all()?.to_vec1::<f32>()?, rows),
            Err(e) => return Err(e),
        };
        drop(items);
        self.caches
            .extend(taken.into_iter().map(|(s, c, _)| (s, c)));
        Ok(StepOutput {
            step: step.step,
            rows: out_rows as u32,
            data,
        })
    }
}

/// Accept connections for ever; one session at a time, from the head only.
fn accept_loop(
    listener: TcpListener,
    peer: &WorkerPeer,
    tls: Arc<rustls::ServerConfig>,
    jobs: mpsc::SyncSender<Job>,
    hello: Hello,
) -> Result<()> {
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        let (tcp, from) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        // Checked before any TLS work: an address that is not the head's gets nothing.
        if from.ip() != peer.head_address {
            tracing::warn!(%from, expected = %peer.head_address, "refused a cluster connection from an address that is not the head's");
            continue;
        }
        if busy.swap(true, Ordering::AcqRel) {
            tracing::warn!(%from, "refused a second cluster connection while a session is active");
            continue;
        }
        let (tls, jobs, hello, busy, head_name) = (
            tls.clone(),
            jobs.clone(),
            hello.clone(),
            busy.clone(),
            peer.head_name.clone(),
        );
        std::thread::Builder::new()
            .name("bulwark-session".into())
            .spawn(move || {
                match session(tcp, from, &tls, &head_name, &jobs, &hello) {
                    Ok(()) => tracing::info!(%from, "cluster session ended"),
                    Err(e) => {
                        tracing::warn!(%from, error = %format!("{e:#}"), "cluster session ended")
                    }
                }
                let _ = jobs.send(Job::Reset);
                busy.store(false, Ordering::Release);
            })?;
    }
}

type Session = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// One session with the head: TLS, identity, Hello, then steps until the connection ends.
fn session(
    tcp: TcpStream,
    from: SocketAddr,
    tls: &Arc<rustls::ServerConfig>,
    head_name: &str,
    jobs: &mpsc::SyncSender<Job>,
    hello: &Hello,
) -> Result<()> {
    let mut stream = handshake(tcp, from, tls, head_name, hello)?;
    serve_frames(&mut stream, jobs, hello)
}

/// TLS 1.3 with a cluster client certificate, the head's name on it, then the Hello exchange
/// (any mismatch refused by name).
fn handshake(
    tcp: TcpStream,
    from: SocketAddr,
    tls: &Arc<rustls::ServerConfig>,
    head_name: &str,
    hello: &Hello,
) -> Result<Session> {
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(super::HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(super::STEP_DEADLINE))?;
    let conn = rustls::ServerConnection::new(tls.clone())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .context("TLS handshake")?;
    }
    let cert = stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no client certificate")?;
    if !crate::tls::peer_has_name(cert, head_name) {
        bail!("the client certificate is not {head_name:?}'s (cluster.head_name); refused");
    }
    // The handshake's Hello, bounded before anything is agreed.
    let first = frame::read_frame(&mut stream, frame::HANDSHAKE_MAX_FRAME)?;
    ensure!(
        first.kind == Kind::Hello,
        "expected Hello, got {:?}",
        first.kind
    );
    let theirs = Hello::decode(&first.payload)?;
    if let Some(why) = hello.mismatch(&theirs) {
        let _ = frame::write_frame(&mut stream, Kind::Refuse, &frame::encode_reason(&why));
        bail!("handshake refused: {why}");
    }
    frame::write_frame(&mut stream, Kind::HelloOk, &hello.encode())?;
    tracing::info!(%from, "cluster session established with {head_name}");
    Ok(stream)
}

/// Steps, frees and heartbeats until the connection ends or stays silent too long.
fn serve_frames(stream: &mut Session, jobs: &mpsc::SyncSender<Job>, hello: &Hello) -> Result<()> {
    stream
        .sock
        .set_read_timeout(Some(super::SESSION_IDLE_TIMEOUT))?;
    let max = hello.max_frame();
    loop {
        let f = frame::read_frame(stream, max)?;
        match f.kind {
            Kind::Step => {
                let step = Step::decode(&f.payload, hello)?;
                let (tx, rx) = mpsc::sync_channel(1);
                jobs.send(Job::Step(step, tx))
                    .context("the stage thread ended")?;
                match rx.recv().context("the stage thread ended")? {
                    Ok(out) => {
                        let kind = if hello.last {
                            Kind::Logits
                        } else {
                            Kind::Hidden
                        };
                        frame::write_frame(stream, kind, &out.encode())?;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "step failed");
                        frame::write_frame(
                            stream,
                            Kind::StepFailed,
                            &frame::encode_reason(&format!("{e:#}")),
                        )?;
                    }
                }
            }
            Kind::Free => {
                let seqs = frame::decode_free(&f.payload)?;
                jobs.send(Job::Free(seqs))
                    .context("the stage thread ended")?;
            }
            Kind::Ping => frame::write_frame(stream, Kind::Pong, &[])?,
            other => {
                let why = format!("unexpected frame kind {other:?} from the head");
                let _ = frame::write_frame(stream, Kind::Refuse, &frame::encode_reason(&why));
                bail!(why);
            }
        }
    }
}
