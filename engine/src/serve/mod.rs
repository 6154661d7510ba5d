//! `bulwark serve`: the start-up order, the listeners and the connection loop.
//!
//! Start-up order (each step fails closed):
//! 1. read configuration, keys and TLS material (every file closed again once read); open the
//!    model file (kept open: it is parsed through this descriptor); open the GPU, if one is
//!    configured;
//! 2. bind the API and metrics listeners;
//! 3. build every filter and ruleset, then confine the process while it is single-threaded
//!    (Landlock, seccomp, no_new_privs, capabilities, user);
//! 4. start the inference thread: it stacks its narrower filter and creates the compute pools
//!    (candle's and rayon's), so every compute thread inherits both;
//! 5. load the model (hash pin first, then the GGUF, tokenizer and template parsers) through
//!    the descriptor opened in step 1, already confined: Landlock leaves no path readable;
//! 6. start the network runtime and accept connections.

mod connection;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use connection::{Admission, serve_connection};

use crate::api::{self, AppState, error::ApiError, limits::RateLimiter};
use crate::cluster::config::Role;
use crate::config::Config;
use crate::infer::scheduler::{self, SchedulerConfig, StepRunner};
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::model::pin::OpenedModel;

pub fn run(config_path: &Path) -> Result<()> {
    let cfg = Config::load(config_path)?;
    if cfg.role() == Some(Role::Worker) {
        return crate::cluster::worker::run(&cfg);
    }
    let server = cfg.api()?;
    let keys = KeyStore::load(&cfg.resolve(&server.keys_file))?;
    let tls = api_tls(&cfg)?;
    // A cluster head reads its identity now: nothing is readable once confined.
    let cluster_client = head_client_config(&cfg)?;
    // A GPU is opened, and the model loaded and run once on it, before confinement: the CUDA
    // driver loads its JIT compiler and kernel modules on first use, from files Landlock and
    // seccomp will deny (docs/landlock.md, GPU).
    // INVARIANT: the model file is opened before the user switch and Landlock: it is then
    // hashed and parsed through this descriptor, whatever the modes of its parent directories.
    let model_file = open_model(&cfg)?;
    let device = open_device(&cfg)?;
    let model = if device.is_cuda() {
        ModelSource::Loaded(Box::new(load_and_warm_up(&cfg, model_file, &device)?))
    } else {
        ModelSource::Opened(model_file)
    };

    // INVARIANT: listeners are bound before confinement; afterwards no new port can be bound.
    let api_listener = std::net::TcpListener::bind(server.listen)
        .with_context(|| format!("binding server.listen {}", server.listen))?;
    api_listener.set_nonblocking(true)?;
    let metrics_listener = bind_metrics(&cfg)?;
    let notifier = crate::notify::Notifier::from_env();

    // INVARIANT: confined while single-threaded, before the inference thread, the compute
    // pools and the network runtime exist, so that every one of them inherits the
    // confinement. The model is parsed afterwards, confined too (Landlock lets it read only
    // the model file).
    let (status, compute_filter) = crate::confine::confine(&cfg)?;
    let metrics = Arc::new(Metrics::default());
    metrics
        .sandbox_enforced
        .store(u64::from(status.fully_enforced()), Ordering::Relaxed);
    let (state, infer_thread) = start(
        &cfg,
        keys,
        &device,
        metrics,
        Some(compute_filter),
        model,
        cluster_client,
    )?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.engine.io_threads)
        .thread_name("bulwark-io")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let result = runtime.block_on(serve(
        cfg,
        state,
        api_listener,
        metrics_listener,
        tls,
        notifier,
    ));
    runtime.shutdown_timeout(Duration::from_secs(1));
    // Every scheduler handle lived in the state, now dropped: the inference thread ends.
    let _ = infer_thread.join();
    result
}

/// The API's TLS configuration (certificate, key, client CA read now), or `None` for loopback
/// plaintext.
pub fn api_tls(cfg: &Config) -> Result<Option<Arc<rustls::ServerConfig>>> {
    Ok(match cfg.api()?.transport()? {
        crate::config::Transport::LoopbackPlaintext => None,
        crate::config::Transport::Tls {
            cert,
            key,
            client_ca,
        } => Some(Arc::new(crate::tls::server_config(
            &cfg.resolve(cert),
            &cfg.resolve(key),
            client_ca.map(|p| cfg.resolve(p)).as_deref(),
        )?)),
    })
}

/// The metrics listener, bound before confinement (non-blocking, for the network runtime).
pub fn bind_metrics(cfg: &Config) -> Result<Option<std::net::TcpListener>> {
    let Some(addr) = cfg.metrics.listen else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding metrics.listen {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Serve metrics from a thread of their own (a cluster worker has no network runtime).
pub fn spawn_metrics_thread(
    listener: Option<std::net::TcpListener>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let Some(listener) = listener else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics runtime")?;
    std::thread::Builder::new()
        .name("bulwark-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let (_never, shutdown) = watch::channel(false);
                serve_metrics(l, metrics, shutdown).await;
            })
        })?;
    Ok(())
}

/// A cluster head's TLS client for its stages, built before confinement.
fn head_client_config(cfg: &Config) -> Result<Option<Arc<rustls::ClientConfig>>> {
    let Some(c) = cfg.cluster.as_ref().filter(|c| c.role == Role::Head) else {
        return Ok(None);
    };
    let identity = crate::tls::ClusterIdentity::load(
        &cfg.resolve(&c.ca),
        &cfg.resolve(&c.cert),
        &cfg.resolve(&c.key),
    )
    .context("loading the cluster certificate (cluster.ca, cluster.cert, cluster.key)")?;
    Ok(Some(Arc::new(identity.client_config()?)))
}

pub fn open_device(cfg: &Config) -> Result<candle_core::Device> {
    Ok(match cfg.cuda_ordinal() {
        None => candle_core::Device::Cpu,
        Some(n) => candle_core::Device::new_cuda(n)
            .with_context(|| format!("opening engine.device cuda:{n}"))?,
    })
}

/// Open the configured model (a GGUF file, or every pinned file of a directory) with the
/// privileges the server started with.
pub fn open_model(cfg: &Config) -> Result<OpenedModel> {
    let path = cfg.resolve(&cfg.model.path);
    OpenedModel::open(&path, &cfg.model.pin()).with_context(|| {
        format!(
            "model.path {}: the server opens it before it switches to sandbox.user {:?}",
            path.display(),
            cfg.sandbox.user
        )
    })
}

/// The model as `start` receives it: a file still to be parsed (on the CPU, confined), or one
/// already loaded and warmed up (on a GPU, before confinement).
pub enum ModelSource {
    Opened(OpenedModel),
    Loaded(Box<Model>),
}

fn load_model(cfg: &Config, file: OpenedModel, device: &candle_core::Device) -> Result<Model> {
    let loaded = Instant::now();
    let (info, model) = crate::infer::load::load(
        file,
        &cfg.model.pin(),
        &cfg.model.name,
        cfg.model.context_length,
        cfg.model.weights_on(device),
        device,
        cfg.cluster
            .as_ref()
            .filter(|c| c.role == Role::Head)
            .map(|c| c.layer_range()),
    )
    .context("loading the model")?;
    tracing::info!(
        model = %info.name,
        layers = model.cfg.n_layer,
        context_length = info.context_length,
        weights = ?model.weight_format,
        load_ms = loaded.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok((info, model))
}

pub type Model = (
    crate::model::ModelInfo,
    crate::infer::models::llama::LlamaModel,
);

/// Load the model and run a prompt and a decode step through it, so that every kernel it uses
/// is loaded now.
fn load_and_warm_up(
    cfg: &Config,
    file: OpenedModel,
    device: &candle_core::Device,
) -> Result<Model> {
    let (info, model) = load_model(cfg, file, device)?;
    let mut cache = model.new_cache();
    let ids = [info.tokenizer.eos_id, info.tokenizer.eos_id];
    model.forward(&mut [crate::infer::models::llama::BatchItem {
        tokens: &ids,
        cache: &mut cache,
    }])?;
    model.forward(&mut [crate::infer::models::llama::BatchItem {
        tokens: &ids[..1],
        cache: &mut cache,
    }])?;
    Ok((info, model))
}

/// Load the model and start the inference thread, unconfined (for tests).
pub fn build_state(
    cfg: &Config,
    keys: KeyStore,
) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>)> {
    let device = open_device(cfg)?;
    let model = ModelSource::Opened(open_model(cfg)?);
    let client = head_client_config(cfg)?;
    start(
        cfg,
        keys,
        &device,
        Arc::new(Metrics::default()),
        None,
        model,
        client,
    )
}

/// Start the inference thread (it stacks `compute_filter` on itself and creates the compute
/// pools), load the model using those pools, hand it over, and build the router's state.
pub fn start(
    cfg: &Config,
    keys: KeyStore,
    device: &candle_core::Device,
    metrics: Arc<Metrics>,
    compute_filter: Option<sandbox::ComputeFilter>,
    model: ModelSource,
    cluster_client: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Arc<AppState>, std::thread::JoinHandle<()>)> {
    let pending = scheduler::spawn(
        scheduler_config(cfg),
        cfg.compute_threads(),
        metrics.clone(),
        compute_filter,
    )?;
    let (info, model) = match model {
        ModelSource::Loaded(m) => *m,
        ModelSource::Opened(file) => load_model(cfg, file, device)?,
    };
    let info = Arc::new(info);
    let runner: Box<dyn StepRunner> = match cluster_client {
        Some(client) => Box::new(start_pipeline(cfg, model, client)?),
        None => Box::new(model),
    };
    let (handle, infer_thread) = pending.start(runner, info.clone())?;
    Ok((app_state(cfg, keys, metrics, info, handle)?, infer_thread))
}

/// The scheduler's settings from `[engine]` and `[limits]`.
pub fn scheduler_config(cfg: &Config) -> SchedulerConfig {
    SchedulerConfig {
        max_batch: cfg.engine.max_batch,
        max_batch_tokens: cfg.engine.max_batch_tokens,
        queue_depth: cfg.limits.queue_depth,
        prefix_cache_bytes: cfg.engine.prefix_cache_mb << 20,
    }
}

/// What the router serves from: the configuration's limits, keys and CORS origins, the
/// model's API view and the scheduler that runs it.
pub fn app_state(
    cfg: &Config,
    keys: KeyStore,
    metrics: Arc<Metrics>,
    model: Arc<crate::model::ModelInfo>,
    scheduler: scheduler::SchedulerHandle,
) -> Result<Arc<AppState>> {
    let server = cfg.api()?;
    Ok(Arc::new(AppState {
        keys,
        limits: cfg.limits.clone(),
        cors_origins: server.cors_origins.clone(),
        anonymous_health: server.anonymous_health,
        model,
        scheduler,
        metrics,
        rate: RateLimiter::new(cfg.limits.rate_limit_per_minute),
        in_flight: Arc::new(Semaphore::new(cfg.limits.max_in_flight)),
    }))
}

/// Start one link thread per stage and the runner that sends steps through them. The links
/// connect in the background; until all are up, the API answers 503.
fn start_pipeline(
    cfg: &Config,
    local: crate::infer::models::llama::LlamaModel,
    client: Arc<rustls::ClientConfig>,
) -> Result<crate::cluster::pipeline::PipelineRunner> {
    use std::sync::atomic::AtomicBool;
    let cluster = cfg.cluster.as_ref().context("[cluster] is required")?;
    anyhow::ensure!(
        local.cfg.n_layer == cluster.total_layers(),
        "cluster.stages end at layer {}, but the model has {} layers: the ranges must cover \
         every layer exactly once",
        cluster.total_layers(),
        local.cfg.n_layer
    );
    let available = Arc::new(AtomicBool::new(false));
    let flags: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
    let notify: Arc<dyn Fn() + Send + Sync> = {
        let (available, flags) = (available.clone(), flags.clone());
        Arc::new(move || {
            let flags = flags.lock().unwrap_or_else(|p| p.into_inner());
            available.store(crate::cluster::pipeline::all_up(&flags), Ordering::Release);
        })
    };
    let max_rows = crate::cluster::max_step_rows(cfg.engine.max_batch_tokens, cfg.engine.max_batch);
    let mut links = Vec::with_capacity(cluster.stages.len());
    for (i, stage) in cluster.stages.iter().enumerate() {
        let hello = crate::cluster::hello_for(
            &local.cfg,
            &cfg.model.pin().identity(),
            stage.layers[0]..stage.layers[1],
            i + 1 == cluster.stages.len(),
            max_rows,
            cfg.engine.max_batch,
        )?;
        let link =
            crate::cluster::link::spawn(stage.clone(), client.clone(), hello, notify.clone())?;
        flags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(link.up.clone());
        links.push(link);
    }
    notify();
    Ok(crate::cluster::pipeline::PipelineRunner::new(
        local, links, available,
    ))
}

async fn serve(
    cfg: Config,
    state: Arc<AppState>,
    api: std::net::TcpListener,
    metrics_l: Option<std::net::TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    ready: crate::notify::Notifier,
) -> Result<()> {
    let server = cfg.api()?.clone();
    let api = tokio::net::TcpListener::from_std(api)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(l) = metrics_l {
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(serve_metrics(l, state.metrics.clone(), shutdown_rx.clone()));
    }
    let acceptor = tls.map(TlsAcceptor::from);
    let admission = Admission::new(&cfg.limits, acceptor.clone(), state.metrics.clone());
    tracing::info!(
        listen = %server.listen,
        tls = acceptor.is_some(),
        metrics = ?cfg.metrics.listen,
        "serving"
    );
    ready.ready();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let (tcp, peer) = tokio::select! {
            r = api.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        let _ = tcp.set_nodelay(true);
        let Some(admitted) = admission.admit(tcp, peer) else {
            continue;
        };
        let state = state.clone();
        let acceptor = acceptor.clone();
        let limits = cfg.limits.clone();
        let shutdown = shutdown_rx.clone();
        let grace = Duration::from_secs(server.shutdown_grace_secs);
        tokio::spawn(async move {
            let (tcp, _slots) = admitted.into_parts();
            state.metrics.connections.fetch_add(1, Ordering::Relaxed);
            serve_connection(tcp, peer, acceptor, state.clone(), &limits, shutdown, grace).await;
            state.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_secs(server.shutdown_grace_secs) + Duration::from_secs(1);
    let _ = tokio::time::timeout(grace, admission.all_closed()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn serve_metrics(
    l: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = l.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move {
                    let r = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics"
                    {
                        let mut r =
                            hyper::Response::new(api::body::ApiBody::full(m.render().into()));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    } else {
                        api::error_response(&ApiError::NotFound)
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false);
            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}
