//! Model files: the pinned file, its architecture, tokenizer and chat template. Nothing here
//! knows how the model is computed (that is `infer`, which builds on this module).

pub mod arch;
pub mod file;
pub mod gguf;
pub mod hf;
pub mod lease;
pub mod pin;
pub mod safetensors;
pub mod template;
pub mod tokenizer;

use std::path::Path;

use anyhow::{Context, Result};

use arch::LlamaConfig;
use gguf::GgufFile;
use template::ChatTemplate;
use tokenizer::ModelTokenizer;

/// Where the loader reads weights from, by their GGUF names (a GGUF file, or a Hugging Face
/// directory that maps them).
pub trait TensorSource {
    fn tensor(
        &mut self,
        name: &str,
        device: &candle_core::Device,
    ) -> Result<candle_core::quantized::QTensor>;
    fn has_tensor(&self, name: &str) -> bool;
}

/// What the API layer needs from the model: tokenizer, template, limits. Shared read-only.
pub struct ModelInfo {
    pub name: String,
    pub tokenizer: ModelTokenizer,
    pub template: Option<ChatTemplate>,
    pub context_length: usize,
    pub created: u64,
}

/// A model whose files matched their pins, parsed by its format's reader.
pub enum ParsedModel {
    Gguf(GgufFile),
    Hf(Box<hf::HfModel>),
}

impl ParsedModel {
    /// Parse what `verify` checked. INVARIANT: only a [`pin::VerifiedModel`] gets here, so no
    /// parser sees a byte that did not match its pin.
    pub fn parse(model: pin::VerifiedModel) -> Result<Self> {
        Ok(match model.0 {
            pin::OpenedModel::Gguf(file) => Self::Gguf(GgufFile::parse(file)?),
            pin::OpenedModel::Directory { files, .. } => {
                Self::Hf(Box::new(hf::HfModel::parse(files)?))
            }
        })
    }

    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            Self::Gguf(g) => LlamaConfig::from_gguf(g),
            Self::Hf(h) => Ok(h.config.clone()),
        }
    }

    pub fn tensors(&mut self) -> &mut dyn TensorSource {
        match self {
            Self::Gguf(g) => g,
            Self::Hf(h) => h.as_mut(),
        }
    }

    /// The tokenizer, and the chat template's source when the model has one.
    pub fn tokenizer_and_template(&self) -> Result<(ModelTokenizer, Option<&str>)> {
        match self {
            Self::Gguf(g) => Ok((
                ModelTokenizer::from_gguf(g).context("building the tokenizer")?,
                g.opt_str("tokenizer.chat_template"),
            )),
            Self::Hf(h) => Ok((
                ModelTokenizer::from_hf(&h.tokenizer_json, &h.tokenizer_config, &h.generation)
                    .context("building the tokenizer from tokenizer.json")?,
                h.tokenizer_config.chat_template(),
            )),
        }
    }

    /// The name of the configuration key that sets the vocabulary size.
    pub fn vocab_key(&self) -> String {
        match self {
            Self::Gguf(g) => format!(
                "{}.vocab_size",
                g.opt_str("general.architecture").unwrap_or("?")
            ),
            Self::Hf(_) => "config.json: vocab_size".into(),
        }
    }
}

/// `bulwark model inspect`: architecture, tensors and tokenizer summary of a GGUF file or a
/// Hugging Face directory.
pub fn inspect(path: &Path) -> Result<String> {
    if path.is_dir() {
        return inspect_directory(path);
    }
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
        Ok(c) => w.push_str(&hyperparameters(&c)),
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

/// `bulwark model inspect DIR`: the directory parsed as the server would (with the pins it
/// has now), its configuration, weights and tokenizer summarized.
fn inspect_directory(dir: &Path) -> Result<String> {
    use std::fmt::Write;
    let pin = pin::Pin::Files(pin::directory_pins(dir)?);
    let parsed = ParsedModel::parse(pin::OpenedModel::open(dir, &pin)?.verify(&pin)?)?;
    let mut out = String::new();
    let w = &mut out;
    writeln!(w, "directory: {}", dir.display())?;
    let c = parsed.config()?;
    writeln!(w, "architecture: {:?}", c.arch)?;
    w.push_str(&hyperparameters(&c));
    if let ParsedModel::Hf(h) = &parsed {
        writeln!(w, "weights: {}", h.summary())?;
    }
    let (t, template) = parsed.tokenizer_and_template()?;
    writeln!(
        w,
        "tokenizer: {} ({}), {} tokens, {} special, bos {:?}, eos {}, add_bos {}",
        t.model_kind, t.pre_kind, t.vocab_size, t.special_count, t.bos_id, t.eos_id, t.add_bos
    )?;
    writeln!(
        w,
        "chat_template: {}",
        if template.is_some() {
            "present"
        } else {
            "absent"
        }
    )?;
    Ok(out)
}

/// The hyper-parameters `model inspect` prints, one per line.
fn hyperparameters(c: &LlamaConfig) -> String {
    format!(
        "layers: {}\nhidden: {}\nffn: {}\nheads: {} (kv {})\nhead_dim: {}\ncontext_length: {}\n\
         rope_theta: {}\nrms_eps: {}\nvocab: {}\n",
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
    )
}
