//! The head's connection to one stage: a thread that owns the TLS session, reconnects with a
//! bounded backoff, proves the stage alive with heartbeats, and carries steps and frees for
//! the inference thread (which may not touch the network itself).

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rustls_pki_types::ServerName;

use super::config::StageConfig;
use super::frame::{self, Hello, Kind, Step, StepOutput};
use super::{HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL, STEP_DEADLINE};

/// Commands queued for a link: steps are answered one at a time, so a small queue suffices.
const LINK_QUEUE: usize = 64;
/// Reconnection backoff: from the first to the longest wait. The longest bounds how long a
/// stage that came back waits to be used (the head must recover within 5 s).
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub enum LinkCmd {
    Step(Step, mpsc::SyncSender<Result<StepOutput>>),
    Free(Vec<u64>),
}

/// The inference thread's handle on a link.
pub struct Link {
    pub name: String,
    pub tx: mpsc::SyncSender<LinkCmd>,
    /// Whether the stage is connected and agreed to the handshake.
    pub up: Arc<AtomicBool>,
    /// Counts successful connections: a change means the stage lost every cache.
    pub epoch: Arc<AtomicU64>,
    /// Width of what the stage answers: `hidden` for a middle stage, `vocab` for the last.
    pub out_width: usize,
}

/// Start the link thread for `stage`. `hello` is what the head expects the stage to be.
pub fn spawn(
    stage: StageConfig,
    client: Arc<rustls::ClientConfig>,
    hello: Hello,
    pipeline_up: Arc<dyn Fn() + Send + Sync>,
) -> Result<Link> {
    let (tx, rx) = mpsc::sync_channel(LINK_QUEUE);
    let up = Arc::new(AtomicBool::new(false));
    let epoch = Arc::new(AtomicU64::new(0));
    let out_width = if hello.last {
        hello.vocab as usize
    } else {
        hello.hidden as usize
    };
    let link = Link {
        name: stage.name.clone(),
        tx,
        up: up.clone(),
        epoch: epoch.clone(),
        out_width,
    };
    std::thread::Builder::new()
        .name(format!("bulwark-link-{}", stage.name))
        .spawn(move || {
            LinkThread {
                stage,
                client,
                hello,
                up,
                epoch,
                notify: pipeline_up,
            }
            .run(rx)
        })?;
    Ok(link)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

struct LinkThread {
    stage: StageConfig,
    client: Arc<rustls::ClientConfig>,
    hello: Hello,
    up: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
    notify: Arc<dyn Fn() + Send + Sync>,
}

impl LinkThread {
    fn run(self, rx: mpsc::Receiver<LinkCmd>) {
        let mut backoff = BACKOFF_FIRST;
        let mut logged_down = false;
        loop {
            let mut conn = match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    if !logged_down {
                        tracing::warn!(stage = %self.stage.name, address = %self.stage.address,
                            error = %format!("{e:#}"), "stage unreachable; retrying");
                        logged_down = true;
                    }
                    // Whatever was asked meanwhile fails at once: the pipeline is down.
                    let deadline = std::time::Instant::now() + backoff;
                    while let Some(left) =
                        deadline.checked_duration_since(std::time::Instant::now())
                    {
                        match rx.recv_timeout(left) {
                            Ok(LinkCmd::Step(_, reply)) => {
                                let _ = reply.send(Err(anyhow::Error::new(
                                    crate::infer::scheduler::StageDown,
                                )));
                            }
                            Ok(LinkCmd::Free(_)) => {}
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_FIRST;
            logged_down = false;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            self.up.store(true, Ordering::Release);
            (self.notify)();
            tracing::info!(stage = %self.stage.name, address = %self.stage.address, "stage connected");
            let ended = self.serve(&mut conn, &rx);
            self.up.store(false, Ordering::Release);
            (self.notify)();
            match ended {
                Ok(()) => return, // the inference thread is gone
                Err(e) => tracing::warn!(stage = %self.stage.name,
                    error = %format!("{e:#}"), "stage connection lost"),
            }
        }
    }

    /// TCP, TLS 1.3 with the stage's name verified, then the Hello exchange.
    fn connect(&self) -> Result<Tls> {
        let tcp = TcpStream::connect_timeout(&self.stage.address, HANDSHAKE_TIMEOUT)
            .with_context(|| format!("connecting to {}", self.stage.address))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(STEP_DEADLINE))?;
        let name = ServerName::try_from(self.stage.name.clone())
            .context("cluster.stages name is not a DNS name")?;
        let conn = rustls::ClientConnection::new(self.client.clone(), name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        frame::write_frame(&mut tls, Kind::Hello, &self.hello.encode())
            .context("TLS handshake or Hello")?;
        let reply = frame::read_frame(&mut tls, frame::HANDSHAKE_MAX_FRAME)?;
        match reply.kind {
            Kind::HelloOk => {
                let theirs = Hello::decode(&reply.payload)?;
                if let Some(why) = self.hello.mismatch(&theirs) {
                    bail!("the stage's Hello does not match: {why}");
                }
            }
            Kind::Refuse => bail!(
                "the stage refused the handshake: {}",
                frame::decode_reason(&reply.payload)
            ),
            other => bail!("expected HelloOk, got {other:?}"),
        }
        tls.sock.set_read_timeout(Some(STEP_DEADLINE))?;
        Ok(tls)
    }

    /// Carry commands until the connection fails (`Err`) or the inference thread ends (`Ok`).
    fn serve(&self, conn: &mut Tls, rx: &mpsc::Receiver<LinkCmd>) -> Result<()> {
        let max = self.hello.max_frame();
        loop {
            match rx.recv_timeout(HEARTBEAT_INTERVAL) {
                Ok(LinkCmd::Step(step, reply)) => {
                    let r = self.step(conn, &step, max);
                    let failed = r.is_err();
                    let _ =
                        reply.send(r.map_err(|e| e.context(crate::infer::scheduler::StageDown)));
                    if failed {
                        bail!("step {} failed", step.step);
                    }
                }
                Ok(LinkCmd::Free(seqs)) => {
                    for chunk in seqs.chunks(frame::MAX_FREE_IDS) {
                        frame::write_frame(conn, Kind::Free, &frame::encode_free(chunk))?;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    frame::write_frame(conn, Kind::Ping, &[])?;
                    let f = frame::read_frame(conn, max).context("heartbeat")?;
                    ensure!(f.kind == Kind::Pong, "expected Pong, got {:?}", f.kind);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }

    fn step(&self, conn: &mut Tls, step: &Step, max: usize) -> Result<StepOutput> {
        frame::write_frame(conn, Kind::Step, &step.encode())?;
        let f = frame::read_frame(conn, max).context("waiting for the step's answer")?;
        let (rows, width) = if self.hello.last {
            (step.items.len(), self.hello.vocab as usize)
        } else {
            (step.rows(), self.hello.hidden as usize)
        };
        match f.kind {
            Kind::Hidden if !self.hello.last => {
                StepOutput::decode(&f.payload, step.step, rows, width)
            }
            Kind::Logits if self.hello.last => {
                StepOutput::decode(&f.payload, step.step, rows, width)
            }
            Kind::StepFailed => bail!(
                "the stage failed the step: {}",
                frame::decode_reason(&f.payload)
            ),
            Kind::Refuse => bail!("the stage refused: {}", frame::decode_reason(&f.payload)),
            other => bail!("unexpected {other:?} in answer to a step"),
        }
    }
}
