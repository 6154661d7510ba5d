//! Loading a pinned model (a GGUF file or a Hugging Face directory) into what serves it: the API's view (tokenizer, template,
//! limits) and the compute graph of the stage this node runs.

use anyhow::{Context, Result};
use candle_core::Device;

use super::models::llama::{LlamaModel, StageSpec};
use crate::model::arch::{LlamaConfig, WeightFormat};
use crate::model::pin::{OpenedModel, Pin, VerifiedModel};
use crate::model::template::ChatTemplate;
use crate::model::{ModelInfo, ParsedModel};

/// Load a pinned model (on a cluster head, only `head_layers`): every file hashed and
/// compared with its pin, then the header, tokenizer, template and weights.
pub fn load(
    model: OpenedModel,
    pin: &Pin,
    name: &str,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
    head_layers: Option<std::ops::Range<usize>>,
) -> Result<(ModelInfo, LlamaModel)> {
    let created = model.modified_secs();
    verified_load(model, pin, |verified| {
        load_verified(
            verified,
            name,
            created,
            context_length,
            weights,
            device,
            head_layers,
        )
    })
}

/// Hash every file of `model` against `pin`, then run `load` on what matched, and check, once
/// it is over, that no file changed under it.
fn verified_load<T>(
    model: OpenedModel,
    pin: &Pin,
    load: impl FnOnce(VerifiedModel) -> Result<T>,
) -> Result<T> {
    // INVARIANT: every file is hashed and compared with its pin before any parser sees it.
    let verified = model.verify(pin)?;
    let tripwire = verified.tripwire();
    let loaded = load(verified);
    // INVARIANT: once every byte is read, and before any error of the load is reported (a
    // file changed under the loader explains what it met): the files read are those hashed.
    tripwire.check()?;
    loaded
}

fn load_verified(
    verified: VerifiedModel,
    name: &str,
    created: u64,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
    head_layers: Option<std::ops::Range<usize>>,
) -> Result<(ModelInfo, LlamaModel)> {
    let mut parsed = ParsedModel::parse(verified)?;
    let cfg = parsed.config()?;
    let info = model_info(&parsed, name, created, context_length)?;
    let ctx = info.context_length;
    let stage = match head_layers {
        None => StageSpec::whole(cfg.n_layer),
        // A cluster head: the embedding and the first layers; the stages run the rest.
        Some(layers) => {
            anyhow::ensure!(
                layers.end < cfg.n_layer,
                "cluster.layers of the head end at {}, but the model has {} layers: leave some \
                 to the stages",
                layers.end,
                cfg.n_layer
            );
            StageSpec {
                layers,
                embed: true,
                head: false,
            }
        }
    };
    let model = LlamaModel::load_stage(parsed.tensors(), cfg, stage, weights, device, ctx)?;
    Ok((info, model))
}

/// What the API needs of a model, from its header alone: tokenizer, chat template and context
/// window. (The router tests build their state from this and no weights.)
pub fn model_info(
    model: &ParsedModel,
    name: &str,
    created: u64,
    context_length: Option<usize>,
) -> Result<ModelInfo> {
    let cfg = model.config()?;
    let (tokenizer, template_source) = model.tokenizer_and_template()?;
    // Every id the API accepts must have an embedding row: a larger vocabulary would let a
    // request's token ids fail the whole batch's step instead of being refused.
    anyhow::ensure!(
        tokenizer.vocab_size <= cfg.vocab,
        "the tokenizer has {} tokens but the model has {} embedding rows ({})",
        tokenizer.vocab_size,
        cfg.vocab,
        model.vocab_key()
    );
    let template = match template_source {
        Some(src) => Some(
            ChatTemplate::new(
                src,
                tokenizer
                    .bos_id
                    .map(|id| tokenizer.token_text(id))
                    .unwrap_or_default(),
                tokenizer.token_text(tokenizer.eos_id),
            )
            .context("the chat template (tokenizer.chat_template, or tokenizer_config.json's chat_template)")?,
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

/// Load a pinned model for a worker stage: the hash check, the header and only the tensors
/// of `layers` (and the final norm and LM head when they end at the model's last layer). A
/// worker needs neither the embedding, nor the tokenizer, nor the template.
pub fn load_worker_stage(
    model: OpenedModel,
    pin: &Pin,
    layers: std::ops::Range<usize>,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
) -> Result<LlamaModel> {
    verified_load(model, pin, |verified| {
        load_verified_stage(verified, layers, context_length, weights, device)
    })
}

fn load_verified_stage(
    verified: VerifiedModel,
    layers: std::ops::Range<usize>,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
) -> Result<LlamaModel> {
    let mut parsed = ParsedModel::parse(verified)?;
    let cfg = parsed.config()?;
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
    LlamaModel::load_stage(parsed.tensors(), cfg, stage, weights, device, ctx)
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
