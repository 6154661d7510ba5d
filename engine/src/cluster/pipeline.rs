//! The head's step runner: its own first stage (embedding and first layers), then every
//! remote stage in order through its link; the last one answers with logits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::frame::{Step, StepMeta};
use super::link::{Link, LinkCmd};
use crate::infer::models::llama::LlamaModel;
use crate::infer::scheduler::{StageDown, StepItem, StepRunner, as_batch};

/// How long the inference thread waits for a link's answer beyond the stage's own deadline.
const ANSWER_SLACK: Duration = Duration::from_secs(2);

pub struct PipelineRunner {
    local: LlamaModel,
    links: Vec<Link>,
    /// Each link's connection count when the head last ran a step through it.
    epochs_seen: Vec<u64>,
    available: Arc<AtomicBool>,
    next_step: u64,
}

impl PipelineRunner {
    /// `available` is kept equal to "every link is up" by the links themselves.
    pub fn new(local: LlamaModel, links: Vec<Link>, available: Arc<AtomicBool>) -> Self {
        let epochs_seen = vec![0; links.len()];
        Self {
            local,
            links,
            epochs_seen,
            available,
            next_step: 1,
        }
    }

    /// `true` when a stage reconnected since the last step: its caches are gone.
    fn stages_restarted(&mut self) -> bool {
        let mut restarted = false;
        for (seen, link) in self.epochs_seen.iter_mut().zip(&self.links) {
            let now = link.epoch.load(Ordering::Acquire);
            if *seen != now {
                restarted |= *seen != 0;
                *seen = now;
            }
        }
        restarted
    }
}

/// Recompute the pipeline's availability from its links' flags.
pub fn all_up(flags: &[Arc<AtomicBool>]) -> bool {
    flags.iter().all(|f| f.load(Ordering::Acquire))
}

impl StepRunner for PipelineRunner {
    fn local(&self) -> &LlamaModel {
        &self.local
    }

    fn run(&mut self, items: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        if !self.available.load(Ordering::Acquire) {
            return Err(anyhow::Error::new(StageDown));
        }
        // A sequence that has already run on a stage that reconnected since cannot continue.
        if self.stages_restarted() && items.iter().any(|it| !it.cache.is_empty()) {
            return Err(anyhow::Error::new(StageDown).context("a stage restarted"));
        }
        let meta: Vec<StepMeta> = items
            .iter()
            .map(|it| StepMeta {
                seq: it.seq,
                position: it.cache.len() as u32,
                rows: it.tokens.len() as u32,
            })
            .collect();
        let local = &self.local;
        let x =
            crate::infer::scheduler::on_compute_pool(|| local.embed_and_run(&mut as_batch(items)))?;
        let mut hidden = x.flatten_all()?.to_vec1::<f32>()?;
        let step = self.next_step;
        self.next_step += 1;
        for link in &self.links {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let cmd = LinkCmd::Step(
                Step {
                    step,
                    items: meta.clone(),
                    hidden,
                },
                tx,
            );
            link.tx
                .send(cmd)
                .map_err(|_| anyhow::Error::new(StageDown).context("link thread ended"))?;
            let out = rx
                .recv_timeout(super::STEP_DEADLINE + ANSWER_SLACK)
                .map_err(|_| {
                    anyhow::Error::new(StageDown)
                        .context(format!("stage {} did not answer", link.name))
                })?
                .with_context(|| format!("stage {}", link.name))?;
            hidden = out.data;
        }
        let Some(last) = self.links.last() else {
            bail!("a pipeline without stages");
        };
        // The last stage answered one logits row per sequence.
        let width = last.out_width;
        if hidden.len() != width * items.len() {
            bail!(
                "the last stage answered {} values for {} sequences",
                hidden.len(),
                items.len()
            );
        }
        Ok(hidden.chunks_exact(width).map(<[f32]>::to_vec).collect())
    }

    fn free(&mut self, seq: u64) {
        for link in &self.links {
            // A link that is down drops it; the stage lost its caches anyway.
            let _ = link.tx.send(LinkCmd::Free(vec![seq]));
        }
    }

    fn available(&self) -> Arc<AtomicBool> {
        self.available.clone()
    }
}
