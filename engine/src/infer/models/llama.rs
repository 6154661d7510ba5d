//! The Llama architecture (Llama 2/3, SmolLM, TinyLlama, ...) over a packed batch.
//!
//! One forward pass takes any mix of sequences, each contributing one or more new tokens (a
//! prompt chunk or a single decode token). Their rows are packed into one matrix so every
//! projection and MLP runs as one matrix multiply for the whole batch (that is what makes
//! continuous batching pay on a CPU: the weights are streamed once per step, not once per
//! sequence). Only attention is per sequence, against that sequence's own KV cache.
//!
//! Layers are addressed by index so that a pipeline stage can own a contiguous range of them.

use std::ops::Range;

use anyhow::{Context, Result, ensure};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::embedding::Embedding;
use super::packed::{self, HostKv, PackedLayer, Projection, RopeTable, Shape, Span};
use crate::model::TensorSource;
use crate::model::arch::{LlamaConfig, RopePairs, WeightFormat};

fn linear(q: QTensor, format: WeightFormat, device: &Device) -> Result<QMatMul> {
    Ok(match (format, q.dtype()) {
        (WeightFormat::F32, _) | (_, GgmlDType::F32) => QMatMul::Tensor(q.dequantize(device)?),
        (WeightFormat::F16, _) => QMatMul::TensorF16(q.dequantize_f16(device)?),
        // bf16 (safetensors) has no quantized kernels: computed in f32, as candle would.
        (WeightFormat::Quantized, GgmlDType::BF16) => QMatMul::Tensor(q.dequantize(device)?),
        (WeightFormat::Quantized, _) => QMatMul::QTensor(std::sync::Arc::new(q)),
    })
}

/// Output rows per slice when a single-row product is split across the compute pool: large
/// enough that each slice streams a good share of the weights, small enough to balance.
const MATVEC_SLICE_ROWS: usize = 128;

/// `x · Wᵀ` through candle. One decoding sequence makes a single-row product, for which the
/// GEMM library falls back to a single-threaded GEMV: decode then reads all weights on one
/// core. On the CPU such products are split by output rows across the compute pool (each
/// slice is a contiguous block of the weights), which lets every core stream its share.
/// Every other case is the library's GEMM.
fn candle_forward(m: &QMatMul, x: &Tensor) -> Result<Tensor> {
    let threads = rayon::current_num_threads();
    if let (QMatMul::Tensor(w), true) = (m, x.device().is_cpu() && threads > 1 && x.dims()[0] == 1)
    {
        let out = w.dim(0)?;
        let slice = out.div_ceil(threads).max(MATVEC_SLICE_ROWS);
        if slice < out {
            use rayon::prelude::*;
            let parts = (0..out)
                .step_by(slice)
                .collect::<Vec<_>>()
                .par_iter()
                .map(|&start| x.matmul(&w.narrow(0, start, slice.min(out - start))?.t()?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 1)?);
        }
    }
    Ok(m.forward(x)?)
}

/// One layer's weights for the tensor path.
struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
    /// `(bq, bk, bv)` (Qwen2).
    qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Per-head RMS norm weights of Q and K (Qwen3).
    qk_norm: Option<(Tensor, Tensor)>,
}

impl Block {
    fn load(
        src: &mut dyn TensorSource,
        i: usize,
        cfg: &LlamaConfig,
        format: WeightFormat,
        dev: &Device,
    ) -> Result<Self> {
        let extras = LayerExtras::load(src, i, cfg)?;
        let vector = |v: Vec<f32>| -> Result<Tensor> {
            let n = v.len();
            Ok(Tensor::from_vec(v, n, dev)?)
        };
        let qkv_bias = match extras.qkv_bias {
            Some([q, k, v]) => Some((vector(q)?, vector(k)?, vector(v)?)),
            None => None,
        };
        let qk_norm = match extras.qk_norm {
            Some((q, k)) => Some((vector(q)?, vector(k)?)),
            None => None,
        };
        let mut t = |name: &str| src.tensor(&format!("blk.{i}.{name}.weight"), dev);
        Ok(Self {
            qkv_bias,
            qk_norm,
            attn_norm: t("attn_norm")?.dequantize(dev)?,
            wq: linear(t("attn_q")?, format, dev)?,
            wk: linear(t("attn_k")?, format, dev)?,
            wv: linear(t("attn_v")?, format, dev)?,
            wo: linear(t("attn_output")?, format, dev)?,
            ffn_norm: t("ffn_norm")?.dequantize(dev)?,
            w_gate: linear(t("ffn_gate")?, format, dev)?,
            w_up: linear(t("ffn_up")?, format, dev)?,
            w_down: linear(t("ffn_down")?, format, dev)?,
        })
    }
}

/// A layer's small tensors (norms, biases), dequantized to plain values.
fn values(src: &mut dyn TensorSource, name: &str) -> Result<Vec<f32>> {
    let t = src.tensor(name, &Device::Cpu)?;
    Ok(t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

/// Layer `i`'s extra tensors by architecture: the Q, K and V biases (Qwen2) and the per-head
/// Q and K norms (Qwen3). Required when the architecture has them.
struct LayerExtras {
    qkv_bias: Option<[Vec<f32>; 3]>,
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl LayerExtras {
    fn load(src: &mut dyn TensorSource, i: usize, cfg: &LlamaConfig) -> Result<Self> {
        let name = |t: &str| format!("blk.{i}.{t}");
        let qkv_bias = if cfg.arch.has_qkv_bias() {
            Some([
                values(src, &name("attn_q.bias"))?,
                values(src, &name("attn_k.bias"))?,
                values(src, &name("attn_v.bias"))?,
            ])
        } else {
            None
        };
        let qk_norm = if cfg.arch.has_qk_norm() {
            Some((
                values(src, &name("attn_q_norm.weight"))?,
                values(src, &name("attn_k_norm.weight"))?,
            ))
        } else {
            None
        };
        Ok(Self { qkv_bias, qk_norm })
    }
}

/// `None` when one of the layer's matrices is in a format or shape the kernels lack.
fn load_packed_layer(
    src: &mut dyn TensorSource,
    i: usize,
    cfg: &LlamaConfig,
) -> Result<Option<PackedLayer>> {
    let cpu = Device::Cpu;
    let mut t = |name: &str| src.tensor(&format!("blk.{i}.{name}.weight"), &cpu);
    let (q, k, v, o) = (t("attn_q")?, t("attn_k")?, t("attn_v")?, t("attn_output")?);
    let (gate, up, down) = (t("ffn_gate")?, t("ffn_up")?, t("ffn_down")?);
    let (Some(qkv), Some(wo), Some(gate_up), Some(down)) = (
        Projection::pack(&[&q, &k, &v])?,
        Projection::pack(&[&o])?,
        Projection::pack(&[&gate, &up])?,
        Projection::pack(&[&down])?,
    ) else {
        return Ok(None);
    };
    let extras = LayerExtras::load(src, i, cfg)?;
    Ok(Some(PackedLayer {
        attn_norm: values(src, &format!("blk.{i}.attn_norm.weight"))?,
        qkv,
        qkv_bias: extras.qkv_bias.map(|b| b.concat()),
        qk_norm: extras.qk_norm,
        wo,
        ffn_norm: values(src, &format!("blk.{i}.ffn_norm.weight"))?,
        gate_up,
        down,
    }))
}

/// The layers of `stage`: on the packed path when the weights are to stay quantized on the
/// CPU and the kernels take every matrix of every layer, otherwise as tensors.
fn load_layers(
    src: &mut dyn TensorSource,
    stage: &StageSpec,
    cfg: &LlamaConfig,
    format: WeightFormat,
    device: &Device,
    max_seq_len: usize,
) -> Result<Layers> {
    if format == WeightFormat::Quantized && device.is_cpu() {
        let shape = Shape::of(cfg);
        let mut packed = Vec::with_capacity(stage.layers.len());
        for i in stage.layers.clone() {
            match load_packed_layer(src, i, cfg)? {
                Some(layer) => {
                    layer.check(&shape).with_context(|| format!("layer {i}"))?;
                    packed.push(layer);
                }
                None => {
                    tracing::info!(
                        layer = i,
                        "a weight format the kernels lack: layers run through candle"
                    );
                    packed.clear();
                    break;
                }
            }
        }
        if packed.len() == stage.layers.len() {
            return Ok(Layers::Packed {
                layers: packed,
                rope: RopeTable::new(cfg, max_seq_len),
            });
        }
    }
    let blocks = stage
        .layers
        .clone()
        .map(|i| Block::load(src, i, cfg, format, device))
        .collect::<Result<Vec<_>>>()?;
    let (cos, sin) = rope_tensors(cfg, max_seq_len, device)?;
    Ok(Layers::Tensors { blocks, cos, sin })
}

/// The final norm and LM head, on the packed path when the layers are and the kernels take
/// the head's format. `tied_embed` (the embedding, when this stage holds it and the head is
/// tied to it) is shared rather than dequantized twice.
fn load_head(
    norm: QTensor,
    lm_head: QTensor,
    packed: bool,
    format: WeightFormat,
    tied_embed: Option<&Tensor>,
    device: &Device,
) -> Result<Head> {
    if packed && let Some(p) = Projection::pack(&[&lm_head])? {
        let norm: Vec<f32> = norm.dequantize(device)?.flatten_all()?.to_vec1()?;
        ensure!(
            norm.len() == p.k(),
            "output_norm.weight has {} values for an LM head of rows of {}",
            norm.len(),
            p.k()
        );
        return Ok(Head::Packed(norm, p));
    }
    let lm_head = match tied_embed.filter(|_| format == WeightFormat::F32) {
        Some(e) => QMatMul::Tensor(e.clone()),
        None => linear(lm_head, format, device)?,
    };
    Ok(Head::Tensors(norm.dequantize(device)?, lm_head))
}

/// `rope_freqs.weight` (Llama 3.1+ rope scaling) when the model has it, checked.
fn read_rope_freqs(src: &mut dyn TensorSource, cfg: &LlamaConfig) -> Result<Option<Vec<f32>>> {
    if !src.has_tensor("rope_freqs.weight") {
        return Ok(None);
    }
    let freqs = values(src, "rope_freqs.weight")?;
    ensure!(
        freqs.len() == cfg.head_dim / 2 && freqs.iter().all(|f| f.is_finite() && *f > 0.0),
        "rope_freqs.weight must hold {} positive factors",
        cfg.head_dim / 2
    );
    Ok(Some(freqs))
}

/// The rotary tables of the tensor path: `cos` and `sin` of every position's angles,
/// `[max_seq_len, head_dim / 2]`.
fn rope_tensors(
    cfg: &LlamaConfig,
    max_seq_len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let factor = cfg.rope_freqs.as_ref().map_or(1.0, |f| f[i]);
            1.0 / (cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32) * factor)
        })
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, max_seq_len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_seq_len, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// The embedding (first stage) and the final norm with the LM head (last stage). A stage
/// without the embedding still reads `token_embd.weight` when it is the head's (tied).
fn load_ends(
    src: &mut dyn TensorSource,
    stage: &StageSpec,
    cfg: &LlamaConfig,
    format: WeightFormat,
    packed: bool,
    device: &Device,
) -> Result<(Option<Embedding>, Option<Head>)> {
    let tied = !src.has_tensor("output.weight");
    let embed_q = if stage.embed || (stage.head && tied) {
        let q = src.tensor("token_embd.weight", device)?;
        ensure!(
            q.shape().dims() == [cfg.vocab, cfg.hidden],
            "token_embd.weight has shape {:?}, expected [{}, {}]",
            q.shape().dims(),
            cfg.vocab,
            cfg.hidden
        );
        Some(q)
    } else {
        None
    };
    let embed = match (&embed_q, stage.embed) {
        // The packed path looks rows up from the file's blocks; a tied f32 head shares one
        // dequantized table with the lookup instead.
        (Some(q), true) => Some(Embedding::load(q, packed, device)?),
        _ => None,
    };
    if !stage.head {
        return Ok((embed, None));
    }
    let dense_embed = match &embed {
        Some(Embedding::Dense(table)) if tied => Some(table),
        _ => None,
    };
    let lm_head = match embed_q {
        Some(q) if tied => q,
        _ => src.tensor("output.weight", device)?,
    };
    let norm = src.tensor("output_norm.weight", device)?;
    let head = load_head(norm, lm_head, packed, format, dense_embed, device)?;
    Ok((embed, Some(head)))
}

/// The layers this instance runs, in one of two paths, with the rotary tables of that path
/// (each computes the rotations its own way, so only one of the two forms is built).
enum Layers {
    /// candle's operations on tensors: every device and weight format. `cos` and `sin` of
    /// every position's angles, `[max_seq_len, head_dim / 2]`.
    Tensors {
        blocks: Vec<Block>,
        cos: Tensor,
        sin: Tensor,
    },
    /// Quantized weights on the CPU through the `kernels` crate (see `packed`).
    Packed {
        layers: Vec<PackedLayer>,
        rope: RopeTable,
    },
}

/// The final norm and LM head, in the path of the layers before them.
enum Head {
    Tensors(Tensor, QMatMul),
    Packed(Vec<f32>, Projection),
}

/// Smallest KV capacity allocated for a sequence; it doubles from there as the sequence grows,
/// so memory follows the real length rather than the model's maximum context.
const KV_MIN_CAPACITY: usize = 64;

/// One layer's keys and values for one sequence: `[n_kv_head, capacity, head_dim]`.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// A sequence's keys and values, held as the model's path needs them.
enum Kv {
    Tensors(Vec<Option<LayerKv>>),
    Host(Vec<HostKv>),
}

/// The KV cache of one sequence across the layers this model instance owns.
pub struct SeqCache {
    kv: Kv,
    len: usize,
}

impl SeqCache {
    /// Tokens already in the cache: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k`/`v` (`[n_kv, t, d]`) for `layer`; returns the whole cached history.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let Kv::Tensors(layers) = &mut self.kv else {
            anyhow::bail!("a cache of the packed path used by the tensor path");
        };
        let t = k.dim(1)?;
        let needed = self.len + t;
        let slot = &mut layers[layer];
        let capacity = slot.as_ref().map_or(0, |kv| kv.k.dims()[1]);
        if needed > capacity {
            let capacity = needed.next_power_of_two().max(KV_MIN_CAPACITY);
            let (h, d) = (k.dim(0)?, k.dim(2)?);
            let k_new = Tensor::zeros((h, capacity, d), k.dtype(), k.device())?;
            let v_new = Tensor::zeros((h, capacity, d), v.dtype(), v.device())?;
            if let Some(old) = slot.take()
                && self.len > 0
            {
                k_new.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v_new.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(LayerKv { k: k_new, v: v_new });
        }
        let kv = slot.as_ref().context("kv slot")?;
        kv.k.slice_set(k, 1, self.len)?;
        kv.v.slice_set(v, 1, self.len)?;
        Ok((kv.k.narrow(1, 0, needed)?, kv.v.narrow(1, 0, needed)?))
    }
}

/// What every layer of one step shares: the rotations of each row's position and the causal
/// mask of each item with more than one new token.
struct Step {
    cos: Tensor,
    sin: Tensor,
    masks: Vec<Option<Tensor>>,
}

/// One sequence's part of a batched step on the whole model (a single node).
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// One sequence's part of a step through a stage's layers: how many new rows it contributes
/// (its position is its cache's length).
pub struct LayerItem<'a> {
    pub rows: usize,
    pub cache: &'a mut SeqCache,
}

/// What one node runs of the model: the embedding (first stage), a contiguous range of
/// layers, and the final norm with the LM head (last stage). A single node runs all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

impl StageSpec {
    pub fn whole(n_layer: usize) -> Self {
        Self {
            layers: 0..n_layer,
            embed: true,
            head: true,
        }
    }
}

pub struct LlamaModel {
    pub cfg: LlamaConfig,
    /// The token embedding, on the first stage only.
    embed: Option<Embedding>,
    layers: Layers,
    stage: StageSpec,
    /// Final norm and LM head, on the last stage only.
    head: Option<Head>,
    max_seq_len: usize,
    device: Device,
    pub weight_format: WeightFormat,
}

impl LlamaModel {
    /// Load every layer. `max_seq_len` bounds the rotary tables (and so the context).
    pub fn load(
        src: &mut dyn TensorSource,
        cfg: LlamaConfig,
        format: WeightFormat,
        device: &Device,
        max_seq_len: usize,
    ) -> Result<Self> {
        let stage = StageSpec::whole(cfg.n_layer);
        Self::load_stage(src, cfg, stage, format, device, max_seq_len)
    }

    /// Load only what `stage` runs: a worker holding layers 15..30 never reads the embedding
    /// unless it is the last stage of a model whose LM head is the embedding (tied weights).
    pub fn load_stage(
        src: &mut dyn TensorSource,
        mut cfg: LlamaConfig,
        stage: StageSpec,
        format: WeightFormat,
        device: &Device,
        max_seq_len: usize,
    ) -> Result<Self> {
        cfg.rope_freqs = read_rope_freqs(src, &cfg)?;
        ensure!(
            stage.layers.start <= stage.layers.end && stage.layers.end <= cfg.n_layer,
            "layers {:?} are outside the model's {} layers",
            stage.layers,
            cfg.n_layer
        );
        let layers = load_layers(src, &stage, &cfg, format, device, max_seq_len)?;
        let packed = matches!(layers, Layers::Packed { .. });
        let (embed, head) = load_ends(src, &stage, &cfg, format, packed, device)?;
        Ok(Self {
            max_seq_len,
            cfg,
            embed,
            layers,
            stage,
            head,
            device: device.clone(),
            weight_format: format,
        })
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    pub fn stage(&self) -> &StageSpec {
        &self.stage
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> SeqCache {
        let n = self.stage.layers.len();
        let kv = match self.layers {
            Layers::Tensors { .. } => Kv::Tensors((0..n).map(|_| None).collect()),
            Layers::Packed { .. } => Kv::Host((0..n).map(|_| HostKv::default()).collect()),
        };
        SeqCache { kv, len: 0 }
    }

    /// A new cache holding `cache`'s first `len` positions (at most its length), for a prompt
    /// that shares them. `None` on the tensor path, which does not reuse prefixes.
    pub fn copy_cache_prefix(&self, cache: &SeqCache, len: usize) -> Option<SeqCache> {
        let Kv::Host(layers) = &cache.kv else {
            return None;
        };
        let len = len.min(cache.len);
        let width = self.cfg.n_kv_head * self.cfg.head_dim;
        let layers = layers.iter().map(|kv| kv.prefix(len * width)).collect();
        Some(SeqCache {
            kv: Kv::Host(layers),
            len,
        })
    }

    /// Bytes of KV cache that `tokens` positions take in this instance's layers (f16 keys and
    /// values on the packed path).
    pub fn cache_bytes(&self, tokens: usize) -> usize {
        let width = self.cfg.n_kv_head * self.cfg.head_dim;
        tokens * self.stage.layers.len() * 2 * width * 2
    }

    /// Whether this instance runs the whole model (embedding, every layer and the head), so
    /// that a sequence's cache is all of its state.
    pub fn is_whole(&self) -> bool {
        self.stage == StageSpec::whole(self.cfg.n_layer)
    }

    /// Whether the layers run on the packed CPU path (quantized weights through the
    /// `kernels` crate) rather than on candle's tensors.
    pub fn is_packed(&self) -> bool {
        matches!(self.layers, Layers::Packed { .. })
    }

    /// Run one batched step through the whole model; returns the next-token logits (f32,
    /// `vocab` long) for the last token of every item, in order. Advances every item's cache.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>> {
        ensure!(!items.is_empty(), "empty batch");
        let x = self.embed_and_run(items)?;
        self.logits(&x, &last_rows(items.iter().map(|it| it.tokens.len())))
    }

    /// The first stage's work: embed every item's new tokens and run this stage's layers over
    /// them; the packed hidden states, `[rows, hidden]`. Advances every item's cache.
    pub fn embed_and_run(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        let ids: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let x = self.embed(&ids)?;
        let mut layer_items: Vec<LayerItem<'_>> = items
            .iter_mut()
            .map(|it| LayerItem {
                rows: it.tokens.len(),
                cache: &mut *it.cache,
            })
            .collect();
        self.run_layers(x, &mut layer_items)
    }

    /// The embedding rows of `ids` (first stage only): `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embed
            .as_ref()
            .context("this stage does not hold the embedding")?
            .lookup(ids, &self.device)
    }

    /// Run this stage's layers over the packed rows `x` (`[rows, hidden]`, items in order);
    /// advances every item's cache by its rows.
    pub fn run_layers(&self, x: Tensor, items: &mut [LayerItem<'_>]) -> Result<Tensor> {
        ensure!(!items.is_empty(), "empty batch");
        let rows: usize = items.iter().map(|it| it.rows).sum();
        ensure!(
            x.dims() == [rows, self.cfg.hidden],
            "hidden states of shape {:?} for {rows} rows of {}",
            x.dims(),
            self.cfg.hidden
        );
        let mut positions = Vec::with_capacity(rows);
        for it in items.iter() {
            ensure!(it.rows > 0, "batch item without tokens");
            ensure!(
                it.cache.len() + it.rows <= self.max_seq_len(),
                "sequence exceeds the context length {}",
                self.max_seq_len()
            );
            positions.extend((0..it.rows).map(|j| (it.cache.len() + j) as u32));
        }
        let x = match &self.layers {
            Layers::Tensors { blocks, cos, sin } => {
                self.run_tensor_layers(blocks, (cos, sin), x, positions, items)?
            }
            Layers::Packed { layers, rope } => self.run_packed_layers(layers, rope, x, items)?,
        };
        for it in items.iter_mut() {
            it.cache.len += it.rows;
        }
        Ok(x)
    }

    fn run_packed_layers(
        &self,
        layers: &[PackedLayer],
        rope: &RopeTable,
        x: Tensor,
        items: &mut [LayerItem<'_>],
    ) -> Result<Tensor> {
        let mut xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut row = 0;
        let spans: Vec<Span> = items
            .iter()
            .map(|it| {
                let span = Span {
                    row,
                    rows: it.rows,
                    past: it.cache.len(),
                };
                row += it.rows;
                span
            })
            .collect();
        let mut caches = items
            .iter_mut()
            .map(|it| match &mut it.cache.kv {
                Kv::Host(layers) => Ok(layers.as_mut_slice()),
                Kv::Tensors(_) => {
                    anyhow::bail!("a cache of the tensor path used by the packed path")
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let shape = Shape::of(&self.cfg);
        packed::run_layers(layers, &shape, rope, &mut xs, &spans, &mut caches)?;
        Ok(Tensor::from_vec(xs, (row, self.cfg.hidden), &self.device)?)
    }

    fn run_tensor_layers(
        &self,
        blocks: &[Block],
        (cos, sin): (&Tensor, &Tensor),
        x: Tensor,
        positions: Vec<u32>,
        items: &mut [LayerItem<'_>],
    ) -> Result<Tensor> {
        let rows = positions.len();
        let pos_t = Tensor::from_vec(positions, rows, &self.device)?;
        let cos = cos.index_select(&pos_t, 0)?.contiguous()?;
        let sin = sin.index_select(&pos_t, 0)?.contiguous()?;

        // Causal masks for the items with more than one new token, built once for all layers.
        let masks = items
            .iter()
            .map(|it| {
                let (t, past) = (it.rows, it.cache.len());
                if t == 1 {
                    return Ok(None);
                }
                let total = past + t;
                let mask: Vec<f32> = (0..t)
                    .flat_map(|i| {
                        (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                Ok(Some(Tensor::from_vec(mask, (t, total), &self.device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let step = Step { cos, sin, masks };
        let mut x = x;
        for (li, block) in blocks.iter().enumerate() {
            x = self.block_forward(block, li, &x, &step, items)?;
        }
        Ok(x)
    }

    /// Final norm and LM head (last stage only) on the given rows of `x`: one logits row each.
    pub fn logits(&self, x: &Tensor, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        let head = self
            .head
            .as_ref()
            .context("this stage does not hold the LM head")?;
        match head {
            Head::Packed(norm, lm_head) => {
                let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                packed::head_logits(norm, lm_head, self.cfg.rms_eps as f32, &xs, rows)
            }
            Head::Tensors(norm, lm_head) => {
                let idx = Tensor::from_vec(rows.to_vec(), rows.len(), &self.device)?;
                let x = x.index_select(&idx, 0)?;
                let x = candle_nn::ops::rms_norm(&x, norm, self.cfg.rms_eps as f32)?;
                let logits = candle_forward(lm_head, &x)?.to_dtype(DType::F32)?;
                Ok(logits.to_vec2::<f32>()?)
            }
        }
    }

    fn block_forward(
        &self,
        b: &Block,
        layer: usize,
        x: &Tensor,
        step: &Step,
        items: &mut [LayerItem<'_>],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let h = candle_nn::ops::rms_norm(x, &b.attn_norm, c.rms_eps as f32)?;
        let (q, k, v) = self.rotated_heads(b, &h, step)?;
        let o = self.attend(layer, &q, &k, &v, &step.masks, items)?;
        let x = (x + candle_forward(&b.wo, &o)?)?;
        let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps as f32)?;
        let gate = candle_nn::ops::silu(&candle_forward(&b.w_gate, &h)?)?;
        let mlp = candle_forward(&b.w_down, &(gate * candle_forward(&b.w_up, &h)?)?)?;
        Ok((x + mlp)?)
    }

    /// Queries, keys and values of the normed rows `h` as `[heads, rows, head_dim]`: biased
    /// and head-normed where the architecture says so, queries and keys rotated for each
    /// row's position.
    fn rotated_heads(
        &self,
        b: &Block,
        h: &Tensor,
        step: &Step,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let n = h.dim(0)?;
        // [n, heads*d] -> [1, heads, n, d] so that every row gets the rotation of its position.
        let heads = |t: Tensor, nh: usize| -> Result<Tensor> {
            Ok(t.reshape((n, nh, c.head_dim))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let (mut q, mut k, mut v) = (
            candle_forward(&b.wq, h)?,
            candle_forward(&b.wk, h)?,
            candle_forward(&b.wv, h)?,
        );
        if let Some((bq, bk, bv)) = &b.qkv_bias {
            (q, k, v) = (
                q.broadcast_add(bq)?,
                k.broadcast_add(bk)?,
                v.broadcast_add(bv)?,
            );
        }
        let (mut q, mut k) = (heads(q, c.n_head)?, heads(k, c.n_kv_head)?);
        let v = heads(v, c.n_kv_head)?.squeeze(0)?;
        if let Some((qn, kn)) = &b.qk_norm {
            let eps = c.rms_eps as f32;
            (q, k) = (
                candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?,
                candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?,
            );
        }
        let rope = match c.arch.rope_pairs() {
            RopePairs::Adjacent => candle_nn::rotary_emb::rope_i,
            RopePairs::Halves => candle_nn::rotary_emb::rope,
        };
        let q = rope(&q.contiguous()?, &step.cos, &step.sin)?.squeeze(0)?;
        let k = rope(&k.contiguous()?, &step.cos, &step.sin)?.squeeze(0)?;
        Ok((q, k, v))
    }

    /// Causal attention of each item's rows against its own cache (appending its new keys
    /// and values); the packed rows' outputs, `[rows, n_head * head_dim]`.
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        masks: &[Option<Tensor>],
        items: &mut [LayerItem<'_>],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let group = c.n_head / c.n_kv_head;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(items.len());
        let mut row = 0;
        for (it, mask) in items.iter_mut().zip(masks) {
            let t = it.rows;
            let past = it.cache.len();
            let (kc, vc) = it.cache.append(
                layer,
                &k.narrow(1, row, t)?.contiguous()?,
                &v.narrow(1, row, t)?.contiguous()?,
            )?;
            let total = past + t;
            // Grouped-query attention without copying K/V per query head: the query heads
            // that share a KV head are stacked as extra rows of that head's matrix.
            let qi =
                q.narrow(1, row, t)?
                    .contiguous()?
                    .reshape((c.n_kv_head, group * t, c.head_dim))?;
            // The cache views are narrowed from a larger buffer; a contiguous copy gives every
            // backend (cuBLAS batched GEMM included) the plain strides it expects.
            let kc = kc.contiguous()?;
            let att = (qi.matmul(&kc.t()?)? * scale)?;
            let att = match mask {
                Some(mask) => att
                    .reshape((c.n_kv_head, group, t, total))?
                    .broadcast_add(mask)?
                    .reshape((c.n_kv_head, group * t, total))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att
                .matmul(&vc.contiguous()?)?
                .reshape((c.n_head, t, c.head_dim))?;
            outs.push(o);
            row += t;
        }
        Ok(Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((row, c.q_width()))?)
    }

    /// Layers held by this instance (all of them on a single node).
    pub fn layer_range(&self) -> Range<usize> {
        self.stage.layers.clone()
    }
}

/// The index of each item's last row in a packed batch: the rows whose logits are sampled.
pub fn last_rows(rows: impl Iterator<Item = usize>) -> Vec<u32> {
    let mut end = 0u32;
    rows.map(|r| {
        end += r as u32;
        end - 1
    })
    .collect()
}

/// log-softmax of one row of logits, in f64 for stable small probabilities.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}
