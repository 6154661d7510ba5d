//! The CPU path for quantized weights: every layer runs on flat `f32` buffers through the
//! `kernels` crate, with no tensor library in between.
//!
//! Why a path of its own: on a small model a decode step is hundreds of tiny operations, and
//! a general tensor library pays an allocation, a dispatch and often a copy for each
//! (reshapes, transposes, concatenations). Here a step allocates its scratch buffers once and
//! every layer reuses them; projections that share an input are one fused matrix (Q, K and V
//! are one `[q + 2·kv, hidden]` product; gate and up one `[2·ffn, hidden]`), so the
//! activations are quantized once and the compute pool meets at one barrier per product.
//!
//! The arithmetic follows llama.cpp's CPU path operation for operation (activations quantized
//! to 8 bits per weight type, RMS norm summed in f64, rotary angles by repeated f32
//! multiplication, keys, values, queries and attention weights rounded to f16 where llama.cpp
//! keeps them in f16), which is what lets it agree with the llama.cpp reference to within
//! rounding (engine/tests/it/reference.rs).

use std::ops::Range;

use anyhow::{Context, Result, ensure};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::model::arch::{LlamaConfig, RopePairs};

/// Matrices whose rows share an input, packed as one matrix of their rows stacked, with its
/// output rows split once across the compute pool (tile-aligned ranges).
pub(super) struct Projection {
    w: kernels::PackedMatrix,
    ranges: Vec<Range<usize>>,
}

impl Projection {
    /// `None` when a part is in a format the kernels lack, the parts' formats or row lengths
    /// differ, or the row length is not whole 32-element blocks.
    pub(super) fn pack(parts: &[&QTensor]) -> Result<Option<Self>> {
        let Some(format) = parts.iter().map(|q| kernel_format(q.dtype())).try_fold(
            None,
            |seen: Option<kernels::WeightFormat>, f| match (seen, f) {
                (_, None) => None,
                (None, Some(f)) => Some(Some(f)),
                (Some(s), Some(f)) => (s == f).then_some(Some(s)),
            },
        ) else {
            return Ok(None);
        };
        let format = format.context("a projection of no matrices")?;
        let mut n_out = 0;
        let mut k = None;
        let mut bytes = Vec::new();
        for q in parts {
            let (rows, cols) = q.shape().dims2()?;
            if *k.get_or_insert(cols) != cols || !cols.is_multiple_of(32) {
                return Ok(None);
            }
            n_out += rows;
            bytes.extend_from_slice(&q.data()?);
        }
        let w = kernels::PackedMatrix::pack(format, &bytes, n_out, k.unwrap_or(0))?;
        let ranges = kernels::split_rows(&w, rayon::current_num_threads());
        Ok(Some(Self { w, ranges }))
    }

    pub(super) fn n_out(&self) -> usize {
        self.w.n_out()
    }

    /// Row length: the width of the input.
    pub(super) fn k(&self) -> usize {
        self.w.k()
    }

    /// `out = x · Wᵀ` for `x` of whole rows of `k`; `out` holds as many rows of `n_out`.
    /// The rows go through the kernels in chunks of at most [`kernels::MAX_ACT_ROWS`], each
    /// chunk's activations quantized once, its output rows split across the pool.
    pub(super) fn apply(
        &self,
        x: &[f32],
        acts: &mut kernels::QuantizedActs,
        out: &mut [f32],
    ) -> Result<()> {
        let (k, n_out) = (self.w.k(), self.w.n_out());
        ensure!(
            x.len() / k * n_out == out.len(),
            "projection output has the wrong size"
        );
        let chunk = kernels::MAX_ACT_ROWS;
        for (xc, oc) in x.chunks(chunk * k).zip(out.chunks_mut(chunk * n_out)) {
            acts.quantize_into(self.w.format().act_format(), xc, k)?;
            let acts = &*acts;
            kernels::split_output(oc, n_out, &self.ranges)
                .into_par_iter()
                .zip(self.ranges.par_iter())
                .try_for_each(|(mut panel, r)| {
                    kernels::matmul_rows(&self.w, acts, r.clone(), &mut panel)
                })?;
        }
        Ok(())
    }
}

fn kernel_format(t: GgmlDType) -> Option<kernels::WeightFormat> {
    match t {
        GgmlDType::Q4_0 => Some(kernels::WeightFormat::Q4_0),
        GgmlDType::Q4_1 => Some(kernels::WeightFormat::Q4_1),
        GgmlDType::Q8_0 => Some(kernels::WeightFormat::Q8_0),
        _ => None,
    }
}

/// One transformer layer's weights for this path.
pub(super) struct PackedLayer {
    pub(super) attn_norm: Vec<f32>,
    /// `[wq; wk; wv]`: one product gives the queries, keys and values of every row.
    pub(super) qkv: Projection,
    /// `[bq; bk; bv]` (Qwen2).
    pub(super) qkv_bias: Option<Vec<f32>>,
    /// RMS norm weights applied to each head of Q and of K before the rotation (Qwen3).
    pub(super) qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub(super) wo: Projection,
    pub(super) ffn_norm: Vec<f32>,
    /// `[w_gate; w_up]`.
    pub(super) gate_up: Projection,
    pub(super) down: Projection,
}

/// One layer's keys and values of one sequence as f16 bits (llama.cpp's default cache type),
/// token-major (`[len][n_kv_head · head_dim]`). They grow by amortised doubling as the
/// sequence does.
#[derive(Default)]
pub struct HostKv {
    k: Vec<u16>,
    v: Vec<u16>,
}

impl HostKv {
    /// A copy of the first `values` keys and values (positions times the row width).
    pub(super) fn prefix(&self, values: usize) -> Self {
        Self {
            k: self.k[..values.min(self.k.len())].to_vec(),
            v: self.v[..values.min(self.v.len())].to_vec(),
        }
    }
}

/// Rotary angles per position, computed as ggml's rope cache does (`theta *= theta_scale`
/// in f32, divided by the pair's frequency factor when the model has them, then
/// `cosf`/`sinf`), so positions rotate exactly as in llama.cpp.
pub(super) struct RopeTable {
    half: usize,
    pairs: RopePairs,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub(super) fn new(cfg: &LlamaConfig, max_seq_len: usize) -> Self {
        let half = cfg.head_dim / 2;
        let theta_scale = cfg.rope_theta.powf(-2.0 / cfg.head_dim as f32);
        let mut cos = Vec::with_capacity(max_seq_len * half);
        let mut sin = Vec::with_capacity(max_seq_len * half);
        for pos in 0..max_seq_len {
            let mut theta = pos as f32;
            for i in 0..half {
                let factor = cfg.rope_freqs.as_ref().map_or(1.0, |f| f[i]);
                cos.push((theta / factor).cos());
                sin.push((theta / factor).sin());
                theta *= theta_scale;
            }
        }
        Self {
            half,
            pairs: cfg.arch.rope_pairs(),
            cos,
            sin,
        }
    }

    /// Rotates every head of `x` (heads of `2·half` values) for position `pos`, pairing
    /// dimensions as the architecture does.
    fn rotate(&self, x: &mut [f32], pos: usize) {
        let at = pos * self.half;
        let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
        let turn = |x0: f32, x1: f32, c: f32, s: f32| (x0 * c - x1 * s, x0 * s + x1 * c);
        for head in x.chunks_exact_mut(2 * self.half) {
            match self.pairs {
                RopePairs::Adjacent => {
                    for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                        (pair[0], pair[1]) = turn(pair[0], pair[1], c, s);
                    }
                }
                RopePairs::Halves => {
                    let (lo, hi) = head.split_at_mut(self.half);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                        (*a, *b) = turn(*a, *b, c, s);
                    }
                }
            }
        }
    }
}

/// RMS norm of each row of `x` times `weight`, into `out`, as ggml computes it: the sum of
/// squares in f64, the mean and the scale in f32, then the element-wise weight.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Where one sequence's rows sit in a step: its first packed row, how many rows it adds, and
/// how many tokens its cache held before the step.
#[derive(Clone, Copy)]
pub(super) struct Span {
    pub(super) row: usize,
    pub(super) rows: usize,
    pub(super) past: usize,
}

/// Scratch for one step, allocated once and reused by every layer.
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    acts: kernels::QuantizedActs,
}

/// The shapes this path needs from the model's configuration.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) hidden: usize,
    pub(super) ffn: usize,
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
    pub(super) eps: f32,
}

impl Shape {
    pub(super) fn of(cfg: &LlamaConfig) -> Self {
        Self {
            hidden: cfg.hidden,
            ffn: cfg.ffn,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            eps: cfg.rms_eps as f32,
        }
    }

    fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

impl PackedLayer {
    /// Checks that the fused matrices have the shapes this configuration implies.
    pub(super) fn check(&self, s: &Shape) -> Result<()> {
        ensure!(
            self.qkv.n_out() == s.q_width() + 2 * s.kv_width()
                && self.wo.n_out() == s.hidden
                && self.gate_up.n_out() == 2 * s.ffn
                && self.down.n_out() == s.hidden,
            "layer projections do not match the model's shape"
        );
        ensure!(
            self.qkv.k() == s.hidden
                && self.wo.k() == s.q_width()
                && self.gate_up.k() == s.hidden
                && self.down.k() == s.ffn,
            "layer projections' row lengths do not match the model's shape"
        );
        ensure!(
            self.attn_norm.len() == s.hidden && self.ffn_norm.len() == s.hidden,
            "layer norms are not embedding_length long"
        );
        ensure!(
            self.qkv_bias
                .as_ref()
                .is_none_or(|b| b.len() == self.qkv.n_out()),
            "the Q, K and V biases do not match their projections"
        );
        ensure!(
            self.qk_norm
                .as_ref()
                .is_none_or(|(q, k)| q.len() == s.head_dim && k.len() == s.head_dim),
            "the Q and K norms are not one head long"
        );
        Ok(())
    }
}

/// Runs `layers` over the packed rows `x` (`[rows][hidden]`, sequences in `spans` order),
/// appending each sequence's keys and values to its caches (`caches[i][layer]`).
pub(super) fn run_layers(
    layers: &[PackedLayer],
    shape: &Shape,
    rope: &RopeTable,
    x: &mut [f32],
    spans: &[Span],
    caches: &mut [&mut [HostKv]],
) -> Result<()> {
    let rows = x.len() / shape.hidden;
    let mut s = Scratch {
        normed: vec![0.0; rows * shape.hidden],
        qkv: vec![0.0; rows * (shape.q_width() + 2 * shape.kv_width())],
        attn: vec![0.0; rows * shape.q_width()],
        proj: vec![0.0; rows * shape.hidden],
        gate_up: vec![0.0; rows * 2 * shape.ffn],
        act: vec![0.0; rows * shape.ffn],
        acts: kernels::QuantizedActs::default(),
    };
    for (li, layer) in layers.iter().enumerate() {
        rms_norm(x, &layer.attn_norm, shape.eps, &mut s.normed);
        layer.qkv.apply(&s.normed, &mut s.acts, &mut s.qkv)?;
        if let Some(bias) = &layer.qkv_bias {
            s.qkv
                .chunks_exact_mut(bias.len())
                .for_each(|row| add_into(row, bias));
        }
        if let Some((q_norm, k_norm)) = &layer.qk_norm {
            norm_heads(shape, &mut s.qkv, q_norm, k_norm);
        }
        rotate_and_cache(shape, rope, &mut s.qkv, spans, caches, li);
        attention(shape, &s.qkv, spans, caches, li, &mut s.attn);
        layer.wo.apply(&s.attn, &mut s.acts, &mut s.proj)?;
        add_into(x, &s.proj);

        rms_norm(x, &layer.ffn_norm, shape.eps, &mut s.normed);
        layer
            .gate_up
            .apply(&s.normed, &mut s.acts, &mut s.gate_up)?;
        swiglu(&s.gate_up, shape.ffn, &mut s.act);
        layer.down.apply(&s.act, &mut s.acts, &mut s.proj)?;
        add_into(x, &s.proj);
    }
    Ok(())
}

/// RMS norm of each query head and each key head of every row of `[q | k | v]`, in place.
fn norm_heads(shape: &Shape, qkv: &mut [f32], q_norm: &[f32], k_norm: &[f32]) {
    let (qw, kw, d) = (shape.q_width(), shape.kv_width(), shape.head_dim);
    let mut head = vec![0.0; d];
    for row in qkv.chunks_exact_mut(qw + 2 * kw) {
        let (q, rest) = row.split_at_mut(qw);
        for (part, weight) in [(q, q_norm), (&mut rest[..kw], k_norm)] {
            for h in part.chunks_exact_mut(d) {
                rms_norm(h, weight, shape.eps, &mut head);
                h.copy_from_slice(&head);
            }
        }
    }
}

/// `silu(gate) · up` per row of `[gate | up]`.
fn swiglu(gate_up: &[f32], ffn: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (g, u) = gu.split_at(ffn);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// Rotates each row's queries and keys for its position, rounds queries to f16 (llama.cpp
/// converts them to the f16 cache's type for the `K·q` product), and appends the keys and
/// values, rounded to f16, to the sequence's cache of this layer.
fn rotate_and_cache(
    shape: &Shape,
    rope: &RopeTable,
    qkv: &mut [f32],
    spans: &[Span],
    caches: &mut [&mut [HostKv]],
    layer: usize,
) {
    let (qw, kw) = (shape.q_width(), shape.kv_width());
    let width = qw + 2 * kw;
    for (span, cache) in spans.iter().zip(caches.iter_mut()) {
        let kv = &mut cache[layer];
        kv.k.truncate(span.past * kw);
        kv.v.truncate(span.past * kw);
        for i in 0..span.rows {
            let row = &mut qkv[(span.row + i) * width..(span.row + i + 1) * width];
            let (q, rest) = row.split_at_mut(qw);
            let (k, v) = rest.split_at_mut(kw);
            rope.rotate(q, span.past + i);
            rope.rotate(k, span.past + i);
            kernels::round_to_f16(q);
            kernels::extend_f16(&mut kv.k, k);
            kernels::extend_f16(&mut kv.v, v);
        }
    }
}

/// Causal grouped-query attention of every row against its own sequence's cache, one task
/// per (sequence, query head) across the pool; writes `[rows][n_head · head_dim]`.
fn attention(
    shape: &Shape,
    qkv: &[f32],
    spans: &[Span],
    caches: &[&mut [HostKv]],
    layer: usize,
    out: &mut [f32],
) {
    let (d, qw, kw) = (shape.head_dim, shape.q_width(), shape.kv_width());
    let width = qw + 2 * kw;
    let group = shape.n_head / shape.n_kv_head;
    let scale = 1.0 / (d as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..spans.len())
        .flat_map(|i| (0..shape.n_head).map(move |h| (i, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, h)| {
            let (span, kv) = (spans[i], &caches[i][layer]);
            let g = h / group;
            let mut o = vec![0.0f32; span.rows * d];
            let mut weights = Vec::with_capacity(span.past + span.rows);
            for t in 0..span.rows {
                let row = span.row + t;
                let q = &qkv[row * width + h * d..row * width + (h + 1) * d];
                let seen = span.past + t + 1;
                weights.clear();
                let keys = kv.k[..seen * kw].chunks_exact(kw);
                weights
                    .extend(keys.map(|key| kernels::dot_f16(q, &key[g * d..(g + 1) * d]) * scale));
                softmax_f16(&mut weights);
                let acc = &mut o[t * d..(t + 1) * d];
                for (&p, value) in weights.iter().zip(kv.v.chunks_exact(kw)) {
                    kernels::axpy_f16(acc, p, &value[g * d..(g + 1) * d]);
                }
            }
            o
        })
        .collect();
    for (&(i, h), o) in tasks.iter().zip(results) {
        let span = spans[i];
        for t in 0..span.rows {
            let at = (span.row + t) * qw + h * d;
            out[at..at + d].copy_from_slice(&o[t * d..(t + 1) * d]);
        }
    }
}

/// Softmax in place, the weights then rounded to f16 (llama.cpp converts them to the f16
/// value cache's type for the `V·p` product); the sum is taken in f64 as ggml does.
fn softmax_f16(w: &mut [f32]) {
    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for x in w.iter_mut() {
        *x = (*x - max).exp();
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    for x in w.iter_mut() {
        *x *= inv;
    }
    kernels::round_to_f16(w);
}

/// The final RMS norm and the LM head on the given rows of `x`: one logits row each.
pub(super) fn head_logits(
    norm: &[f32],
    head: &Projection,
    eps: f32,
    x: &[f32],
    rows: &[u32],
) -> Result<Vec<Vec<f32>>> {
    let hidden = norm.len();
    let mut picked = Vec::with_capacity(rows.len() * hidden);
    for &r in rows {
        let r = r as usize;
        picked.extend_from_slice(x.get(r * hidden..(r + 1) * hidden).context("row index")?);
    }
    let mut normed = vec![0.0; picked.len()];
    rms_norm(&picked, norm, eps, &mut normed);
    let mut out = vec![0.0; rows.len() * head.n_out()];
    head.apply(&normed, &mut kernels::QuantizedActs::default(), &mut out)?;
    Ok(out.chunks(head.n_out()).map(<[f32]>::to_vec).collect())
}
