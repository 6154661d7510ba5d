//! Loading a pinned model file into what serves it: the API's view (tokenizer, template,
//! limits) and the compute graph of the stage this node runs.

use anyhow::{Context, Result};
use candle_core::Device;

use super::models::llama::{LlamaModel, StageSpec};
use crate::model::ModelInfo;
use crate::model::arch::{LlamaConfig, WeightFormat};
use crate::model::gguf::{GgufFile, ModelFile};
use crate::model::template::ChatTemplate;
use crate::model::tokenizer::ModelTokenizer;

/// Load a pinned GGUF model (on a cluster head, only `head_layers`): hash check, then header, tokenizer, template and weights.
pub fn load(
    file: ModelFile,
    sha256: &crate::digest::Sha256,
    name: &str,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
    head_layers: Option<std::ops::Range<usize>>,
) -> Result<(ModelInfo, LlamaModel)> {
    // INVARIANT: the hash check inside open_pinned runs before any parser sees the file.
    let created = file.modified_secs();
    let mut gguf = GgufFile::open_pinned(file, sha256)?;
    let cfg = LlamaConfig::from_gguf(&gguf)?;
    let info = model_info(&gguf, name, created, context_length)?;
    let ctx = info.context_length;
    let model = match head_layers {
        None => LlamaModel::load(&mut gguf, weights, device, ctx)?,
        // A cluster head: the embedding and the first layers; the stages run the rest.
        Some(layers) => {
            anyhow::ensure!(
                layers.end < cfg.n_layer,
                "cluster.layers of the head end at {}, but the model has {} layers: leave some \
                 to the stages",
                layers.end,
                cfg.n_layer
            );
            let stage = StageSpec {
                layers,
                embed: true,
                head: false,
            };
            LlamaModel::load_stage(&mut gguf, stage, weights, device, ctx)?
        }
    };
    Ok((info, model))
}

/// What the API needs of a model, from its header alone: tokenizer, chat template and context
/// window. (The router tests build their state from this and no weights.)
pub fn model_info(
    gguf: &GgufFile,
    name: &str,
    created: u64,
    context_length: Option<usize>,
) -> Result<ModelInfo> {
    let cfg = LlamaConfig::from_gguf(gguf)?;
    let tokenizer = ModelTokenizer::from_gguf(gguf).context("building the tokenizer")?;
    // Every id the API accepts must have an embedding row: a larger vocabulary would let a
    // request's token ids fail the whole batch's step instead of being refused.
    anyhow::ensure!(
        tokenizer.vocab_size <= cfg.vocab,
        "tokenizer.ggml.tokens has {} tokens but the model has {} embedding rows ({}.vocab_size)",
        tokenizer.vocab_size,
        cfg.vocab,
        cfg.arch.key_prefix()
    );
    let template = match gguf.opt_str("tokenizer.chat_template") {
        Some(src) => Some(
            ChatTemplate::new(
                src,
                tokenizer
                    .bos_id
                    .map(|id| tokenizer.token_text(id))
                    .unwrap_or_default(),
                tokenizer.token_text(tokenizer.eos_id),
            )
            .context("tokenizer.chat_template")?,
        ),
        None => None,
    };
    Ok(ModelInfo {
        name: name.to_owned(),
        tokenizer,
        template,
        context_length: context_window(context_length, &cfg)?,
        created,
    })
}

/// Load a pinned GGUF model for a worker stage: the hash check, the header and only the
/// tensors of `layers` (and the final norm and LM head when they end at the model's last
/// layer). A worker needs neither the embedding, nor the tokenizer, nor the template.
pub fn load_worker_stage(
    file: ModelFile,
    sha256: &crate::digest::Sha256,
    layers: std::ops::Range<usize>,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
) -> Result<LlamaModel> {
    // INVARIANT: the hash check inside open_pinned runs before any parser sees the file.
    let mut gguf = GgufFile::open_pinned(file, sha256)?;
    let cfg = LlamaConfig::from_gguf(&gguf)?;
    anyhow::ensure!(
        layers.end <= cfg.n_layer,
        "cluster.layers [{}, {}) go past the model's {} layers",
        layers.start,
        layers.end,
        cfg.n_layer
    );
    let ctx = context_window(context_length, &cfg)?;
    let stage = StageSpec {
        head: layers.end == cfg.n_layer,
        layers,
        embed: false,
    };
    LlamaModel::load_stage(&mut gguf, stage, weights, device, ctx)
}

fn context_window(configured: Option<usize>, cfg: &LlamaConfig) -> Result<usize> {
    match configured {
        Some(n) if n > cfg.context_length => anyhow::bail!(
            "model.context_length {n} exceeds the model's own context length {}",
            cfg.context_length
        ),
        Some(n) => Ok(n),
        None => Ok(cfg.context_length),
    }
}
