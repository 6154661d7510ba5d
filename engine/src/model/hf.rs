//! Hugging Face model directories: `config.json`, the weights in safetensors (one file, or
//! shards listed by `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`
//! (its `chat_template`) and, when pinned, `generation_config.json`.
//!
//! Only data is read: nothing in the directory is ever executed. A configuration that names
//! custom code (`auto_map`) or a feature the engine does not compute is refused by its key.
//! Tensors are served under their GGUF names (the loader knows one naming), with Llama's Q and
//! K rows permuted as llama.cpp's converter does, so both formats run the same arithmetic.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::QTensor;
use serde::Deserialize;

use super::TensorSource;
use super::arch::{Arch, LlamaConfig};
use super::file::ModelFile;
use super::safetensors::{self, SafetensorsFile};

pub const CONFIG_FILE: &str = "config.json";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// The files the loader reads when they exist (the index adds its shards).
pub const FILES_READ: &[&str] = &[
    CONFIG_FILE,
    INDEX_FILE,
    WEIGHTS_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
];

/// Size caps of the JSON files: generous for real models (Qwen's tokenizer.json is 7 MB, a
/// 400-shard index 100 KB), small enough that a hostile file cannot exhaust memory.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Largest head count or head size accepted (real models: up to 128 heads of up to 256).
const MAX_HEAD_DIM_OR_COUNT: usize = 1 << 14;
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// `config.json`, the keys the engine reads. Other keys are ignored, except those that would
/// change the computation, which are refused by name in [`HfConfig::check_supported`].
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    partial_rotary_factor: Option<f64>,
    auto_map: Option<serde_json::Value>,
    quantization_config: Option<serde_json::Value>,
}

impl HfConfig {
    fn arch(&self) -> Result<Arch> {
        let [name] = self.architectures.as_slice() else {
            bail!(
                "config.json: architectures must name exactly one architecture, not {:?}",
                self.architectures
            );
        };
        Ok(match name.as_str() {
            "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => bail!(
                "config.json: architectures is {other:?}; supported: LlamaForCausalLM, \
                 MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
            ),
        })
    }

    /// Refuse, by key, what would make the engine compute another model than the checkpoint's.
    fn check_supported(&self, arch: Arch) -> Result<()> {
        if self.auto_map.is_some() {
            bail!(
                "config.json: auto_map names custom code; Bulwark never runs code from a model \
                 directory, and a model that needs it is not supported"
            );
        }
        if self.quantization_config.is_some() {
            bail!("config.json: quantization_config: quantized checkpoints are not supported");
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            bail!("config.json: hidden_act {act:?} is not supported (only \"silu\")");
        }
        ensure!(
            !self.attention_bias || arch == Arch::Qwen2,
            "config.json: attention_bias is not supported for this architecture"
        );
        ensure!(!self.mlp_bias, "config.json: mlp_bias is not supported");
        if let Some(f) = self.partial_rotary_factor.filter(|f| *f != 1.0) {
            bail!(
                "config.json: partial_rotary_factor {f}: partial rotary embeddings are not supported"
            );
        }
        Ok(())
    }

    /// The window of sliding-window attention, when the model uses one (Mistral 7B v0.1;
    /// Qwen2 only with `use_sliding_window`).
    fn sliding_window(&self, arch: Arch) -> Option<usize> {
        match arch {
            Arch::Llama => self.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 => self
                .sliding_window
                .filter(|_| self.use_sliding_window == Some(true)),
        }
    }

    fn to_llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.arch()?;
        self.check_supported(arch)?;
        let n_head = self.num_attention_heads;
        let n_kv_head = self.num_key_value_heads.unwrap_or(n_head);
        // Bounded before any product or table sized by them (a head count of 2^63 + 4 would
        // wrap the widths into agreeing with small tensors).
        let heads_and_dims = [n_head, n_kv_head, self.head_dim.unwrap_or(1)];
        ensure!(
            heads_and_dims.iter().all(|&d| d <= MAX_HEAD_DIM_OR_COUNT),
            "config.json: num_attention_heads, num_key_value_heads and head_dim must be at most \
             {MAX_HEAD_DIM_OR_COUNT}"
        );
        ensure!(
            n_head > 0 && n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
            "config.json: num_attention_heads {n_head} is not a positive multiple of \
             num_key_value_heads {n_kv_head}"
        );
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / n_head);
        ensure!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "config.json: the attention head size {head_dim} is not a positive even number"
        );
        let dims = [
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.vocab_size,
        ];
        ensure!(
            dims.iter().all(|&d| (1..=1 << 24).contains(&d)),
            "config.json: hidden_size, intermediate_size, num_hidden_layers and vocab_size must \
             be between 1 and {}",
            1 << 24
        );
        let rope_theta = self.rope_theta.unwrap_or(10_000.0);
        ensure!(
            rope_theta.is_finite() && rope_theta > 1.0,
            "config.json: rope_theta must be a number above 1"
        );
        ensure!(
            self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0,
            "config.json: rms_norm_eps must be positive"
        );
        let context_length = super::arch::window_capped(
            self.max_position_embeddings,
            self.sliding_window(arch),
            "config.json: sliding_window",
        )?;
        Ok(LlamaConfig {
            arch,
            n_layer: self.num_hidden_layers,
            n_head,
            n_kv_head,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            head_dim,
            rope_theta,
            rope_freqs: None,
            rms_eps: self.rms_norm_eps,
            vocab: self.vocab_size,
            context_length,
        })
    }
}

/// Llama 3's rope frequency factors from `rope_scaling`, as llama.cpp's converter writes them
/// into `rope_freqs.weight`; `None` when the model has no scaling.
fn rope_factors(
    scaling: Option<&serde_json::Value>,
    cfg: &LlamaConfig,
) -> Result<Option<Vec<f32>>> {
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(None);
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match kind {
        "default" => return Ok(None),
        "llama3" => {}
        other => {
            bail!("config.json: rope_scaling type {other:?} is not supported (only \"llama3\")")
        }
    }
    let num = |key: &str, default: f64| -> Result<f64> {
        match s.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| {
                    format!("config.json: rope_scaling.{key} must be a positive number")
                }),
        }
    };
    let factor = num("factor", 8.0)?;
    let low = num("low_freq_factor", 1.0)?;
    let high = num("high_freq_factor", 4.0)?;
    let old_context = num("original_max_position_embeddings", 8192.0)?;
    ensure!(
        high > low,
        "config.json: rope_scaling.high_freq_factor must exceed low_freq_factor"
    );
    let dim = cfg.head_dim;
    let factors = (0..dim / 2)
        .map(|i| {
            // In f64 throughout (the converter takes the frequencies from float32 torch, the
            // rest in Python floats): the same factors to f32 precision, with no f32 `powf`
            // whose last bit may depend on the CPU.
            let freq = 1.0 / f64::from(cfg.rope_theta).powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < old_context / high {
                1.0
            } else if wavelen > old_context / low {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    Ok(Some(factors))
}

/// A JSON string, or an object with a `content` string (an AddedToken as tokenizer_config
/// writes special tokens).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum TokenText {
    Text(String),
    Added { content: String },
}

impl TokenText {
    pub fn text(&self) -> &str {
        match self {
            Self::Text(s) | Self::Added { content: s } => s,
        }
    }
}

/// A chat template: one string, or named templates (the `default` one is used).
#[derive(Deserialize)]
#[serde(untagged)]
enum Templates {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// `tokenizer_config.json`, the keys the engine reads.
#[derive(Deserialize, Default)]
pub struct TokenizerConfig {
    chat_template: Option<Templates>,
    pub bos_token: Option<TokenText>,
    pub eos_token: Option<TokenText>,
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    pub fn chat_template(&self) -> Option<&str> {
        match self.chat_template.as_ref()? {
            Templates::One(s) => Some(s),
            Templates::Named(list) => list
                .iter()
                .find(|t| t.name == "default")
                .map(|t| t.template.as_str()),
        }
    }
}

/// One id or a list of ids (`eos_token_id` in generation_config.json).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub enum Ids {
    One(u32),
    Many(Vec<u32>),
}

/// `generation_config.json`, the keys the engine reads.
#[derive(Deserialize, Default)]
pub struct GenerationConfig {
    pub eos_token_id: Option<Ids>,
}

impl GenerationConfig {
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(Ids::One(id)) => vec![*id],
            Some(Ids::Many(ids)) => ids.clone(),
        }
    }
}

/// The shard file names an index lists (`weight_map`'s values), each once.
pub fn shard_names(index: &[u8]) -> Result<Vec<String>> {
    let map = weight_map(index)?;
    let mut names: Vec<String> = map.into_values().collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn weight_map(index: &[u8]) -> Result<BTreeMap<String, String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).context(INDEX_FILE)?;
    for shard in index.weight_map.values() {
        ensure!(
            super::pin::valid_file_name(shard),
            "{INDEX_FILE}: {shard:?} is not a file name in the model directory"
        );
    }
    Ok(index.weight_map)
}

/// A parsed, pinned Hugging Face directory.
pub struct HfModel {
    pub config: LlamaConfig,
    tied: bool,
    rope_factors: Option<Vec<f32>>,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → index in `shards`.
    location: HashMap<String, usize>,
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config: TokenizerConfig,
    pub generation: GenerationConfig,
}

/// Take the pinned file `name` out of `files`, or say it must be pinned.
fn take(files: &mut BTreeMap<String, ModelFile>, name: &str) -> Result<ModelFile> {
    files.remove(name).with_context(|| {
        format!(
            "model.files has no entry for {name}: every file the server reads must be pinned \
             (`bulwark model hash DIR` prints the table)"
        )
    })
}

fn json<T: serde::de::DeserializeOwned>(file: &mut ModelFile, name: &str, max: u64) -> Result<T> {
    let bytes = file.read_all(max)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{name} is not what it should be"))
}

impl HfModel {
    /// Parse a directory whose files all matched their pins.
    pub fn parse(mut files: BTreeMap<String, ModelFile>) -> Result<Self> {
        let hf: HfConfig = json(
            &mut take(&mut files, CONFIG_FILE)?,
            CONFIG_FILE,
            MAX_CONFIG_BYTES,
        )?;
        let config = hf.to_llama_config()?;
        let rope_factors = rope_factors(hf.rope_scaling.as_ref(), &config)?;
        let tokenizer_json = take(&mut files, TOKENIZER_FILE)?.read_all(MAX_TOKENIZER_BYTES)?;
        let tokenizer_config = json(
            &mut take(&mut files, TOKENIZER_CONFIG_FILE)?,
            TOKENIZER_CONFIG_FILE,
            MAX_CONFIG_BYTES,
        )?;
        let generation = match files.remove(GENERATION_CONFIG_FILE) {
            Some(mut f) => json(&mut f, GENERATION_CONFIG_FILE, MAX_CONFIG_BYTES)?,
            None => GenerationConfig::default(),
        };
        let (shards, location) = open_shards(&mut files)?;
        let model = Self {
            tied: hf.tie_word_embeddings || !location.contains_key("lm_head.weight"),
            config,
            rope_factors,
            shards,
            location,
            tokenizer_json,
            tokenizer_config,
            generation,
        };
        model.check_tensors()?;
        Ok(model)
    }

    /// The weights in a line: tensors, files, element types.
    pub fn summary(&self) -> String {
        let mut types = BTreeMap::<String, usize>::new();
        for shard in &self.shards {
            for e in shard.tensors.values() {
                *types.entry(format!("{:?}", e.dtype)).or_default() += 1;
            }
        }
        let types: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        format!(
            "{} tensors in {} safetensors file(s) ({})",
            self.location.len(),
            self.shards.len(),
            types.join(", ")
        )
    }

    /// Every tensor the architecture needs, with its shape, by HF name.
    fn expected(&self) -> BTreeMap<String, Vec<usize>> {
        let c = &self.config;
        let (h, q, kv) = (c.hidden, c.q_width(), c.kv_width());
        let mut want = BTreeMap::from([
            ("model.embed_tokens.weight".to_owned(), vec![c.vocab, h]),
            ("model.norm.weight".to_owned(), vec![h]),
        ]);
        if !self.tied {
            want.insert("lm_head.weight".into(), vec![c.vocab, h]);
        }
        for i in 0..c.n_layer {
            let mut layer = vec![
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![q, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, q]),
                ("mlp.gate_proj.weight", vec![c.ffn, h]),
                ("mlp.up_proj.weight", vec![c.ffn, h]),
                ("mlp.down_proj.weight", vec![h, c.ffn]),
            ];
            if c.arch.has_qkv_bias() {
                layer.push(("self_attn.q_proj.bias", vec![q]));
                layer.push(("self_attn.k_proj.bias", vec![kv]));
                layer.push(("self_attn.v_proj.bias", vec![kv]));
            }
            if c.arch.has_qk_norm() {
                layer.push(("self_attn.q_norm.weight", vec![c.head_dim]));
                layer.push(("self_attn.k_norm.weight", vec![c.head_dim]));
            }
            for (name, shape) in layer {
                want.insert(format!("model.layers.{i}.{name}"), shape);
            }
        }
        want
    }

    /// Each tensor the model needs is present with its shape, and no other tensor is: one the
    /// engine would ignore means a feature it would not compute.
    fn check_tensors(&self) -> Result<()> {
        // Counted first, so that a config.json declaring millions of layers is refused
        // without listing their tensors.
        let c = &self.config;
        let per_layer = 9
            + if c.arch.has_qkv_bias() { 3 } else { 0 }
            + if c.arch.has_qk_norm() { 2 } else { 0 };
        let needed = c.n_layer.saturating_mul(per_layer) + 2 + usize::from(!self.tied);
        ensure!(
            needed <= self.location.len(),
            "config.json implies {needed} tensors, but the weights hold {}",
            self.location.len()
        );
        let want = self.expected();
        for (name, shape) in &want {
            let i = *self
                .location
                .get(name)
                .with_context(|| format!("the weights have no tensor {name}"))?;
            let have = &self.shards[i].tensors[name].shape;
            ensure!(
                have == shape,
                "tensor {name} in {} has shape {have:?}, but config.json makes it {shape:?}",
                self.shards[i].name()
            );
        }
        for name in self.location.keys() {
            // Old Llama checkpoints store the rotary frequencies (recomputed here), and a tied
            // model may still carry its head.
            let harmless = name.ends_with(".rotary_emb.inv_freq") || name == "lm_head.weight";
            ensure!(
                want.contains_key(name) || harmless,
                "tensor {name} is not part of a {:?} model as this server computes it; \
                 refusing it rather than ignoring it",
                self.config.arch
            );
        }
        Ok(())
    }

    fn hf_tensor(&mut self, name: &str, device: &candle_core::Device) -> Result<QTensor> {
        let i = *self
            .location
            .get(name)
            .with_context(|| format!("the weights have no tensor {name}"))?;
        let (entry, mut bytes) = self.shards[i].bytes(name)?;
        if let Some(heads) = self.rope_rows_permuted(name) {
            bytes = interleave_rope_rows(&bytes, &entry.shape, heads, entry.dtype.size())?;
        }
        safetensors::qtensor(entry.dtype, &bytes, &entry.shape, device)
    }

    /// Heads to permute for Llama's Q and K (HF rotates halves of a head, GGUF adjacent pairs).
    fn rope_rows_permuted(&self, name: &str) -> Option<usize> {
        if self.config.arch != Arch::Llama {
            return None;
        }
        if name.ends_with("self_attn.q_proj.weight") {
            Some(self.config.n_head)
        } else if name.ends_with("self_attn.k_proj.weight") {
            Some(self.config.n_kv_head)
        } else {
            None
        }
    }
}

/// The weights: `model.safetensors`, or the index and its shards; each tensor in one file.
fn open_shards(
    files: &mut BTreeMap<String, ModelFile>,
) -> Result<(Vec<SafetensorsFile>, HashMap<String, usize>)> {
    let names = match files.remove(INDEX_FILE) {
        Some(mut index) => shard_names(&index.read_all(MAX_INDEX_BYTES)?)?,
        None => vec![WEIGHTS_FILE.to_owned()],
    };
    let mut shards = Vec::with_capacity(names.len());
    let mut location = HashMap::new();
    for name in names {
        let shard = SafetensorsFile::parse(take(files, &name)?)?;
        for tensor in shard.tensors.keys() {
            if location.insert(tensor.clone(), shards.len()).is_some() {
                bail!("tensor {tensor} is in more than one weights file");
            }
        }
        shards.push(shard);
    }
    Ok((shards, location))
}

/// Reorder each head's rows from HF's `[first halves; second halves]` to GGUF's adjacent pairs
/// (llama.cpp's converter, `permute`): row `j * d/2 + i` of a head becomes row `2i + j`.
fn interleave_rope_rows(
    bytes: &[u8],
    shape: &[usize],
    heads: usize,
    elem: usize,
) -> Result<Vec<u8>> {
    let [rows, cols] = shape else {
        bail!("a Q or K projection with shape {shape:?}");
    };
    ensure!(
        heads > 0 && rows.is_multiple_of(2 * heads),
        "a Q or K projection of {rows} rows for {heads} heads"
    );
    let (head_rows, row_bytes) = (rows / heads, cols * elem);
    let half = head_rows / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * head_rows + j * half + i) * row_bytes;
                let to = (h * head_rows + 2 * i + j) * row_bytes;
                out[to..to + row_bytes].copy_from_slice(&bytes[from..from + row_bytes]);
            }
        }
    }
    Ok(out)
}

/// GGUF tensor names within a layer and their HF names.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The HF name of a GGUF tensor name, if it has one.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == tensor)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

impl TensorSource for HfModel {
    fn tensor(&mut self, name: &str, device: &candle_core::Device) -> Result<QTensor> {
        if name == "rope_freqs.weight" {
            let f = self
                .rope_factors
                .clone()
                .context("the model has no rope scaling")?;
            let n = f.len();
            let t = candle_core::Tensor::from_vec(f, n, device)?;
            return Ok(QTensor::quantize(
                &t,
                candle_core::quantized::GgmlDType::F32,
            )?);
        }
        if name == "output.weight" && self.tied {
            bail!("the output head is tied to the embedding");
        }
        let hf =
            hf_name(name).with_context(|| format!("no tensor {name} in a Hugging Face model"))?;
        self.hf_tensor(&hf, device)
    }

    fn has_tensor(&self, name: &str) -> bool {
        match name {
            "rope_freqs.weight" => self.rope_factors.is_some(),
            "output.weight" => !self.tied,
            _ => hf_name(name).is_some_and(|hf| self.location.contains_key(&hf)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rows_interleave_per_head_like_llama_cpp_converter() {
        // 2 heads of 4 rows, 1 column of one byte: head rows [a0 a1 b0 b1] → [a0 b0 a1 b1].
        let rows: Vec<u8> = (0..8).collect();
        let out = interleave_rope_rows(&rows, &[8, 1], 2, 1).unwrap();
        assert_eq!(out, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(interleave_rope_rows(&rows, &[8, 1], 3, 1).is_err());
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.1.unknown").is_none());
    }

    fn config(extra: &str) -> Result<LlamaConfig> {
        let text = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-5,"max_position_embeddings":32768,"vocab_size":100{extra}}}"#
        );
        serde_json::from_str::<HfConfig>(&text)?.to_llama_config()
    }

    #[test]
    fn what_the_engine_would_not_compute_is_refused_by_key() {
        assert!(config("").is_ok());
        for (extra, key) in [
            (r#","auto_map":{"AutoModel":"modeling_x.X"}"#, "auto_map"),
            (r#","hidden_act":"gelu""#, "hidden_act"),
            (r#","mlp_bias":true"#, "mlp_bias"),
            (r#","attention_bias":true"#, "attention_bias"),
            (r#","partial_rotary_factor":0.5"#, "partial_rotary_factor"),
            (
                r#","quantization_config":{"bits":4}"#,
                "quantization_config",
            ),
            (r#","num_key_value_heads":3"#, "num_key_value_heads"),
            (
                r#","head_dim":4611686018427387904"#,
                "head_dim must be at most",
            ),
            (
                r#","num_attention_heads":9223372036854775812"#,
                "num_attention_heads",
            ),
        ] {
            let err = format!("{:#}", config(extra).expect_err(extra));
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = serde_json::from_str::<HfConfig>(r#"{"architectures":["GPT2LMHeadModel"]}"#);
        assert!(err.is_err());
    }

    /// A directory of files with these contents, opened as pinned files.
    fn directory(files: &[(&str, &[u8])]) -> (tempfile::TempDir, BTreeMap<String, ModelFile>) {
        let dir = tempfile::tempdir().unwrap();
        let mut opened = BTreeMap::new();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
            opened.insert(
                (*name).to_owned(),
                ModelFile::open(&dir.path().join(name)).unwrap(),
            );
        }
        (dir, opened)
    }

    #[test]
    fn millions_of_declared_layers_are_refused_by_count_at_once() {
        let config = br#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":16777216,"num_attention_heads":2,
            "rms_norm_eps":1e-5,"max_position_embeddings":64,"vocab_size":16}"#;
        let header = br#"{"model.norm.weight":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#;
        let mut weights = (header.len() as u64).to_le_bytes().to_vec();
        weights.extend_from_slice(header);
        weights.extend_from_slice(&[0u8; 32]);
        let (_dir, files) = directory(&[
            (CONFIG_FILE, config),
            (TOKENIZER_FILE, b"{}"),
            (TOKENIZER_CONFIG_FILE, b"{}"),
            (WEIGHTS_FILE, &weights),
        ]);
        let started = std::time::Instant::now();
        let err = format!("{:#}", HfModel::parse(files).err().expect("refused"));
        assert!(err.contains("config.json implies"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_sliding_window_caps_the_context_where_it_equals_full_attention() {
        let c = config(r#","sliding_window":4096"#).unwrap();
        assert_eq!(c.context_length, 4096);
        assert_eq!(
            config(r#","sliding_window":null"#).unwrap().context_length,
            32768
        );
    }

    #[test]
    fn llama3_rope_scaling_gives_llama_cpp_factors() {
        let mut c = config(r#","rope_theta":500000.0"#).unwrap();
        c.head_dim = 128;
        c.rope_theta = 500000.0;
        let s = serde_json::json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192});
        let f = rope_factors(Some(&s), &c).unwrap().unwrap();
        assert_eq!(f.len(), 64);
        // High frequencies are kept, low ones divided by the factor, a smooth ramp between.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        let yarn = serde_json::json!({"rope_type":"yarn","factor":4.0});
        assert!(format!("{:#}", rope_factors(Some(&yarn), &c).unwrap_err()).contains("yarn"));
    }
}
