//! Multi-node serving: the model split into pipeline stages across nodes, joined by mutually
//! authenticated TLS 1.3 and the fixed binary frames of [`frame`] (docs/cluster.md).
//!
//! The head runs the API and the first layers and dials every stage ([`link`], one thread per
//! stage, behind [`pipeline::PipelineRunner`]); a worker runs one range of layers for the one
//! head it accepts ([`worker`]). The inference threads never touch the network: they exchange
//! steps with the network threads through bounded channels.

pub mod config;
pub mod frame;
pub mod link;
pub mod pipeline;
pub mod worker;

use std::time::Duration;

use crate::model::arch::LlamaConfig;

/// How often an idle link proves the stage is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A stage that answers neither a step nor a heartbeat within this time is down.
pub const STEP_DEADLINE: Duration = Duration::from_secs(5);
/// A worker ends a session that sends nothing (not even a heartbeat) for this long, so that a
/// head that vanished (a cut link) does not hold the one session slot.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Time allowed to connect and complete the TLS handshake and the Hello exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// This node's side of the handshake for a stage running `layers` of `model`.
pub fn hello_for(
    model: &LlamaConfig,
    sha256: &crate::digest::Sha256,
    layers: std::ops::Range<usize>,
    last: bool,
    max_rows: usize,
    max_items: usize,
) -> anyhow::Result<frame::Hello> {
    Ok(frame::Hello {
        version: frame::PROTOCOL_VERSION,
        model_sha256: sha256.0,
        layers: (layers.start as u32, layers.end as u32),
        last,
        dtype: frame::DTYPE_F32,
        hidden: model.hidden as u32,
        vocab: model.vocab as u32,
        max_rows: max_rows as u32,
        max_items: max_items as u32,
    })
}

/// The most rows one step can carry: the scheduler's token budget, or one per sequence when
/// more sequences decode than the budget holds.
pub fn max_step_rows(max_batch_tokens: usize, max_batch: usize) -> usize {
    max_batch_tokens.max(max_batch)
}
