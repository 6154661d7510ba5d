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

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    pub vocab: usize,
    pub context_length: usize,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            bail!("general.architecture is {arch:?}; only \"llama\" models are supported");
        }
        let n_head = gguf.get_u32("llama.attention.head_count")? as usize;
        let hidden = gguf.get_u32("llama.embedding_length")? as usize;
        ensure!(
            n_head > 0 && hidden.is_multiple_of(n_head),
            "embedding_length not divisible by head_count"
        );
        let n_kv_head = gguf
            .opt_u32("llama.attention.head_count_kv")
            .map_or(n_head, |v| v as usize);
        ensure!(
            n_kv_head > 0 && n_head.is_multiple_of(n_kv_head),
            "head_count not divisible by head_count_kv"
        );
        let head_dim = gguf
            .opt_u32("llama.rope.dimension_count")
            .map_or(hidden / n_head, |v| v as usize);
        ensure!(
            head_dim == hidden / n_head,
            "partial rotary embeddings are not supported"
        );
        if gguf.has_tensor("rope_freqs.weight") {
            bail!("models with rope frequency factors (rope_freqs.weight) are not supported");
        }
        let vocab = match gguf.opt_u32("llama.vocab_size") {
            Some(v) => v as usize,
            None => gguf.get_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            n_layer: gguf.get_u32("llama.block_count")? as usize,
            n_head,
            n_kv_head,
            hidden,
            ffn: gguf.get_u32("llama.feed_forward_length")? as usize,
            head_dim,
            rope_theta: gguf.opt_f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: gguf
                .opt_f32("llama.attention.layer_norm_rms_epsilon")
                .unwrap_or(1e-5) as f64,
            vocab,
            context_length: gguf.opt_u32("llama.context_length").unwrap_or(2048) as usize,
        })
    }
}
