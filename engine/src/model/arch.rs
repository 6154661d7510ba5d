//! What a model file says about its architecture (hyper-parameters read from the GGUF metadata,
//! unsupported features refused by name), and how its weights are to be held for compute.

use anyhow::{Result, bail, ensure};

use super::gguf::GgufFile;

/// How the weights are held in memory for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightFormat {
    /// Dequantize to f32 at load: candle's f32 GEMM (about 4x the file size in memory; 540 MB
    /// for the demo model). The default on CUDA.
    F32,
    /// Dequantize to f16: half the memory of f32.
    F16,
    /// Keep the file's quantized blocks: least memory and fewest bytes read per token. On the
    /// CPU, Q4_0, Q4_1 and Q8_0 run on the `kernels` crate with activations quantized to 8 bits
    /// as llama.cpp does. The default on the CPU.
    Quantized,
}

/// The architectures of the Llama family this engine runs: one decoder (RMS norm, rotary
/// attention with grouped KV heads, SwiGLU) with per-architecture options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 1/2/3.x, Mistral, SmolLM, TinyLlama (GGUF `llama`).
    Llama,
    /// Qwen2 and Qwen2.5: biases on Q, K and V.
    Qwen2,
    /// Qwen3 (dense): an RMS norm on each head of Q and K before the rotation.
    Qwen3,
}

impl Arch {
    fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            other => bail!(
                "general.architecture is {other:?}; supported: \"llama\", \"qwen2\", \"qwen3\""
            ),
        })
    }

    /// The GGUF metadata prefix of the architecture's keys.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// How rotary embeddings pair the dimensions of a head (llama.cpp's rope type).
    pub fn rope_pairs(self) -> RopePairs {
        match self {
            // GGUF conversion permutes Llama's Q and K rows so that pairs are adjacent.
            Self::Llama => RopePairs::Adjacent,
            Self::Qwen2 | Self::Qwen3 => RopePairs::Halves,
        }
    }

    pub fn has_qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    pub fn has_qk_norm(self) -> bool {
        self == Self::Qwen3
    }
}

/// Which dimensions of a head a rotation turns together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopePairs {
    /// `(2i, 2i + 1)`: llama.cpp's "normal" rope (Llama in GGUF).
    Adjacent,
    /// `(i, i + d/2)`: llama.cpp's "neox" rope (Qwen).
    Halves,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    /// Per-pair frequency divisors (Llama 3.1+ rope scaling, `rope_freqs.weight`).
    pub rope_freqs: Option<Vec<f32>>,
    pub rms_eps: f64,
    pub vocab: usize,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = Arch::from_name(gguf.get_str("general.architecture")?)?;
        let key = |k: &str| format!("{}.{k}", arch.key_prefix());
        let n_head = gguf.get_u32(&key("attention.head_count"))? as usize;
        let hidden = gguf.get_u32(&key("embedding_length"))? as usize;
        ensure!(
            n_head > 0,
            "{} must be positive",
            key("attention.head_count")
        );
        let n_kv_head = gguf
            .opt_u32(&key("attention.head_count_kv"))
            .map_or(n_head, |v| v as usize);
        ensure!(
            n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
            "{} is not divisible by {}",
            key("attention.head_count"),
            key("attention.head_count_kv")
        );
        // Qwen3 sets the head size itself (its heads are not hidden / n_head wide).
        let head_dim = gguf
            .opt_u32(&key("attention.key_length"))
            .map_or(hidden / n_head, |v| v as usize);
        if let Some(v) = gguf.opt_u32(&key("attention.value_length")) {
            ensure!(
                v as usize == head_dim,
                "{} differs from the key length: not supported",
                key("attention.value_length")
            );
        }
        ensure!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "the attention head size {head_dim} is not a positive even number"
        );
        let rot = gguf
            .opt_u32(&key("rope.dimension_count"))
            .map_or(head_dim, |v| v as usize);
        ensure!(
            rot == head_dim,
            "{} is {rot}, not the head size {head_dim}: partial rotary embeddings are not supported",
            key("rope.dimension_count")
        );
        if let Some(kind) = gguf.opt_str(&key("rope.scaling.type")) {
            ensure!(
                kind == "none",
                "{} is {kind:?}: only Llama 3's frequency factors (rope_freqs.weight) are \
                 supported",
                key("rope.scaling.type")
            );
        }
        let vocab = match gguf.opt_u32(&key("vocab_size")) {
            Some(v) => v as usize,
            None => gguf.get_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            arch,
            n_layer: gguf.get_u32(&key("block_count"))? as usize,
            n_head,
            n_kv_head,
            hidden,
            ffn: gguf.get_u32(&key("feed_forward_length"))? as usize,
            head_dim,
            rope_theta: gguf.opt_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_freqs: None,
            rms_eps: gguf
                .opt_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f64,
            vocab,
            context_length: window_capped(
                gguf.opt_u32(&key("context_length")).unwrap_or(2048) as usize,
                gguf.opt_u32(&key("attention.sliding_window"))
                    .map(|w| w as usize),
                &key("attention.sliding_window"),
            )?,
        })
    }

    /// Width of the queries of one row (all heads).
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the keys (or values) of one row (all KV heads).
    pub fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// The context window of a model that may declare sliding-window attention: capped at the
/// window, where attending to every earlier token and attending to the last `window` tokens
/// are the same computation. (Mistral 7B v0.1: 4096 of its 32768 positions.)
pub fn window_capped(context: usize, window: Option<usize>, key: &str) -> Result<usize> {
    match window {
        Some(0) => bail!("{key} is 0"),
        Some(w) if w < context => {
            tracing::info!(
                window = w,
                context,
                "sliding-window attention: the context window is capped at the window"
            );
            Ok(w)
        }
        _ => Ok(context),
    }
}
