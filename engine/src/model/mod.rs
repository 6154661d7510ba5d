//! Model files: loading (hash pin first), tokenizer and chat template from the file itself.

pub mod gguf;
pub mod template;
pub mod tokenizer;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;

use crate::infer::models::llama::{LlamaConfig, LlamaModel, WeightFormat};
use gguf::GgufFile;
use template::ChatTemplate;
use tokenizer::ModelTokenizer;

/// What the API layer needs from the model: tokenizer, template, limits. Shared read-only.
pub struct ModelInfo {
    pub name: String,
    pub tokenizer: ModelTokenizer,
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
    pub created: u64,
}

/// Load a pinned GGUF model: hash check, then header, tokenizer, template and weights.
pub fn load(
    path: &Path,
    sha256: &str,
    name: &str,
    context_length: Option<usize>,
    weights: WeightFormat,
    device: &Device,
) -> Result<(ModelInfo, LlamaModel)> {
    // INVARIANT: the hash check inside open_pinned runs before any parser sees the file.
    let mut gguf = GgufFile::open_pinned(path, sha256)?;
    let cfg = LlamaConfig::from_gguf(&gguf)?;
    let ctx = match context_length {
        Some(n) if n > cfg.context_length => anyhow::bail!(
            "model.context_length {n} exceeds the model's own context length {}",
            cfg.context_length
        ),
        Some(n) => n,
        None => cfg.context_length,
    };
    let tokenizer = ModelTokenizer::from_gguf(&gguf).context("building the tokenizer")?;
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
    let model = LlamaModel::load(&mut gguf, weights, device, ctx)?;
    let created = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok((
        ModelInfo {
            name: name.to_owned(),
            tokenizer,
            template,
            context_length: ctx,
            created,
        },
        model,
    ))
}

/// `bulwark model inspect`: architecture, tensors and tokenizer summary of a GGUF file.
pub fn inspect(path: &Path) -> Result<String> {
    use std::fmt::Write;
    let gguf = GgufFile::open_unverified(path)?;
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "file: {}", path.display())?;
    writeln!(
        w,
        "architecture: {}",
        gguf.opt_str("general.architecture").unwrap_or("?")
    )?;
    if let Some(n) = gguf.opt_str("general.name") {
        writeln!(w, "name: {n}")?;
    }
    match LlamaConfig::from_gguf(&gguf) {
        Ok(c) => writeln!(
            w,
            "layers: {}\nhidden: {}\nffn: {}\nheads: {} (kv {})\nhead_dim: {}\ncontext_length: {}\n\
             rope_theta: {}\nrms_eps: {}\nvocab: {}",
            c.n_layer,
            c.hidden,
            c.ffn,
            c.n_head,
            c.n_kv_head,
            c.head_dim,
            c.context_length,
            c.rope_theta,
            c.rms_eps,
            c.vocab
        )?,
        Err(e) => writeln!(w, "unsupported: {e:#}")?,
    }
    let mut by_type = std::collections::BTreeMap::<String, usize>::new();
    for info in gguf.content.tensor_infos.values() {
        *by_type.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
    }
    writeln!(
        w,
        "tensors: {} ({})",
        gguf.content.tensor_infos.len(),
        by_type
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    match ModelTokenizer::from_gguf(&gguf) {
        Ok(t) => writeln!(
            w,
            "tokenizer: {} (pre {}), {} tokens, {} special, bos {:?}, eos {}, add_bos {}",
            t.model_kind, t.pre_kind, t.vocab_size, t.special_count, t.bos_id, t.eos_id, t.add_bos
        )?,
        Err(e) => writeln!(w, "tokenizer: unsupported: {e:#}")?,
    }
    writeln!(
        w,
        "chat_template: {}",
        if gguf.opt_str("tokenizer.chat_template").is_some() {
            "present"
        } else {
            "absent"
        }
    )?;
    Ok(out)
}
