//! Model files: the pinned file, its architecture, tokenizer and chat template. Nothing here
//! knows how the model is computed (that is `infer`, which builds on this module).

pub mod arch;
pub mod gguf;
pub mod template;
pub mod tokenizer;

use std::path::Path;

use anyhow::Result;

use arch::LlamaConfig;
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
