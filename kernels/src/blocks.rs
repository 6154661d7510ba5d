//! Block formats exactly as GGUF / llama.cpp store them, and 8-bit activation quantization
//! with llama.cpp's semantics.
//!
//! Activation quantization follows what llama.cpp *executes* on x86-64 builds with AVX or
//! AVX2 (`quantize_row_q8_0` / `quantize_row_q8_1` in `ggml/src/ggml-cpu/arch/x86/quants.c`),
//! which is what produced the reference logits we compare against on this machine:
//! `d = amax / 127`, stored as f16 (round-to-nearest-even); `q = round_half_even(x * (127 /
//! amax))`; for Q8_1 also `s = f16(d * Σq)` with the unrounded f32 `d`. The portable
//! reference `quantize_row_q8_1_ref` in `ggml-quants.c` differs only in the last ulp: it
//! multiplies by `1 / d` and rounds ties away from zero (`roundf`).

use crate::f16::{f16_to_f32, f32_to_f16};

/// Elements per block in every format here.
pub const QK: usize = 32;

/// Q4_0: `x = d * (q - 8)`, q in 0..16; byte j holds element j (low nibble) and j + 16 (high).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4_0 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Nibbles.
    pub qs: [u8; QK / 2],
}

/// Q4_1: `x = d * q + m`, q in 0..16; nibble order as Q4_0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4_1 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Minimum, f16 bits.
    pub m: u16,
    /// Nibbles.
    pub qs: [u8; QK / 2],
}

/// Q8_0: `x = d * q`; weights, and the activation format paired with Q4_0 and Q8_0 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// Scale, f16 bits.
    pub d: u16,
    /// Quants.
    pub qs: [i8; QK],
}

/// Q8_1: the activation format paired with Q4_1 weights; `s = d * Σq` (f16 bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_1 {
    /// Scale, f16 bits.
    pub d: u16,
    /// `d * sum(qs)`, f16 bits.
    pub s: u16,
    /// Quants.
    pub qs: [i8; QK],
}

// The on-disk sizes; a layout change here would silently misread every GGUF file.
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);

impl BlockQ4_0 {
    /// Parses the 18 little-endian bytes GGUF stores.
    pub fn from_bytes(b: &[u8; 18]) -> Self {
        let mut qs = [0; 16];
        qs.copy_from_slice(&b[2..]);
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            qs,
        }
    }
    /// Dequantizes to f32 (reference for tests).
    pub fn dequantize(&self) -> [f32; QK] {
        let d = f16_to_f32(self.d);
        std::array::from_fn(|i| d * (f32::from(nibble(&self.qs, i)) - 8.0))
    }
}

impl BlockQ4_1 {
    /// Parses the 20 little-endian bytes GGUF stores.
    pub fn from_bytes(b: &[u8; 20]) -> Self {
        let mut qs = [0; 16];
        qs.copy_from_slice(&b[4..]);
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qs,
        }
    }
    /// Dequantizes to f32 (reference for tests).
    pub fn dequantize(&self) -> [f32; QK] {
        let (d, m) = (f16_to_f32(self.d), f16_to_f32(self.m));
        std::array::from_fn(|i| d * f32::from(nibble(&self.qs, i)) + m)
    }
}

impl BlockQ8_0 {
    /// Parses the 34 little-endian bytes GGUF stores.
    pub fn from_bytes(b: &[u8; 34]) -> Self {
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            qs: std::array::from_fn(|i| b[2 + i] as i8),
        }
    }
    /// Dequantizes to f32 (reference for tests).
    pub fn dequantize(&self) -> [f32; QK] {
        let d = f16_to_f32(self.d);
        std::array::from_fn(|i| d * f32::from(self.qs[i]))
    }
}

/// Element `i` (0..32) of a block's nibbles.
pub(crate) fn nibble(qs: &[u8; 16], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0f
    } else {
        qs[i - 16] >> 4
    }
}

/// One block quantized the llama.cpp x86 way; returns (d as f32 before rounding, d bits,
/// quants, Σq). Quants are clamped to ±127 so that non-finite inputs cannot produce -128
/// (the AVX2 kernels rely on |q| <= 127; finite inputs never reach the clamp). The AVX2
/// version gives the same result for finite inputs (tested in `x86`); for NaN or infinite
/// inputs the quants are unspecified but within ±127.
fn quantize_block(x: &[f32]) -> (f32, u16, [i8; QK], i32) {
    let x: &[f32; QK] = x.try_into().expect("32 values");
    #[cfg(target_arch = "x86_64")]
    let (amax, qs, sum) = if crate::Isa::Avx2.is_available() {
        crate::x86::quantize_block(x)
    } else {
        quantize_block_scalar(x)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (amax, qs, sum) = quantize_block_scalar(x);
    let d = amax / 127.0;
    (d, f32_to_f16(d), qs, sum)
}

/// The scalar reference of the quantizer: (amax, quants, Σq).
pub(crate) fn quantize_block_scalar(x: &[f32; QK]) -> (f32, [i8; QK], i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        let r = (round_ties_even_small(v * id) as i32).clamp(-127, 127);
        *q = r as i8;
        sum += r;
    }
    (amax, qs, sum)
}

/// `v.round_ties_even()` for |v| < 2^22 (NaN stays NaN), without the libm call that the
/// baseline x86-64 target (no SSE4.1 `roundps`) makes for it: adding and subtracting
/// 1.5 * 2^23 leaves no fraction bits, so the default rounding mode (nearest, ties to even)
/// does the rounding. Here |v| <= 127 * (1 + 2^-23) by construction.
#[inline]
fn round_ties_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (v + MAGIC) - MAGIC
}

/// llama.cpp's `quantize_row_q8_0` (x86 semantics) for one row; `x.len()` must be
/// `32 * y.len()`.
pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), QK * y.len(), "row length must be 32 per block");
    for (blk, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (_, d, qs, _) = quantize_block(xs);
        *blk = BlockQ8_0 { d, qs };
    }
}

/// llama.cpp's `quantize_row_q8_1` (x86 semantics) for one row.
pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), QK * y.len(), "row length must be 32 per block");
    for (blk, xs) in y.iter_mut().zip(x.chunks_exact(QK)) {
        let (df, d, qs, sum) = quantize_block(xs);
        *blk = BlockQ8_1 {
            d,
            s: f32_to_f16(df * sum as f32),
            qs,
        };
    }
}

/// Which 8-bit activation format a weight format pairs with (llama.cpp's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// Paired with Q4_0 and Q8_0 weights.
    Q8_0,
    /// Paired with Q4_1 weights.
    Q8_1,
}

/// Activation rows quantized once, in the layout the kernels read: per row the 8-bit quants
/// contiguous, and per block the scale widened to f32 (exact), `s` widened to f32 (Q8_1) and
/// the integer Σq (used to undo the +8 / +128 offsets of unsigned weights). Reuse one value
/// across calls ([`QuantizedActs::quantize_into`]) to avoid allocating per step.
///
/// Invariant relied on by the SIMD kernels: every quant is in -127..=127.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    pub(crate) format: Option<ActFormat>,
    pub(crate) rows: usize,
    pub(crate) k: usize,
    pub(crate) qs: Vec<i8>,
    pub(crate) d16: Vec<u16>,
    pub(crate) s16: Vec<u16>,
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) isum: Vec<i32>,
}

impl QuantizedActs {
    /// Quantizes `x` (`rows` rows of `k`, row-major) into a new buffer.
    pub fn quantize(format: ActFormat, x: &[f32], k: usize) -> Result<Self, crate::KernelError> {
        let mut a = Self::default();
        a.quantize_into(format, x, k)?;
        Ok(a)
    }

    /// Quantizes `x` into this buffer, reusing its allocations.
    pub fn quantize_into(
        &mut self,
        format: ActFormat,
        x: &[f32],
        k: usize,
    ) -> Result<(), crate::KernelError> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(crate::KernelError::RowLength { k });
        }
        if !x.len().is_multiple_of(k) {
            return Err(crate::KernelError::ActivationLength { len: x.len(), k });
        }
        let rows = x.len() / k;
        let nb = rows * (k / QK);
        self.format = Some(format);
        self.rows = rows;
        self.k = k;
        self.qs.resize(x.len(), 0);
        for v in [&mut self.d16, &mut self.s16] {
            v.resize(nb, 0);
        }
        for v in [&mut self.d, &mut self.s] {
            v.resize(nb, 0.0);
        }
        self.isum.resize(nb, 0);
        for (i, xs) in x.chunks_exact(QK).enumerate() {
            let (df, d, qs, sum) = quantize_block(xs);
            self.qs[i * QK..(i + 1) * QK].copy_from_slice(&qs);
            self.d16[i] = d;
            self.d[i] = f16_to_f32(d);
            self.isum[i] = sum;
            let s = match format {
                ActFormat::Q8_1 => f32_to_f16(df * sum as f32),
                ActFormat::Q8_0 => 0,
            };
            self.s16[i] = s;
            self.s[i] = f16_to_f32(s);
        }
        Ok(())
    }

    /// Number of activation rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Row length.
    pub fn k(&self) -> usize {
        self.k
    }
    /// The format these activations were quantized to.
    pub fn format(&self) -> Option<ActFormat> {
        self.format
    }

    /// Block `b` of row `j` as llama.cpp's Q8_1 (for tests and interop).
    pub fn block_q8_1(&self, j: usize, b: usize) -> BlockQ8_1 {
        let i = j * (self.k / QK) + b;
        let mut qs = [0; QK];
        qs.copy_from_slice(&self.qs[i * QK..(i + 1) * QK]);
        BlockQ8_1 {
            d: self.d16[i],
            s: self.s16[i],
            qs,
        }
    }

    /// Block `b` of row `j` as llama.cpp's Q8_0.
    pub fn block_q8_0(&self, j: usize, b: usize) -> BlockQ8_0 {
        let q = self.block_q8_1(j, b);
        BlockQ8_0 { d: q.d, qs: q.qs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_1_matches_llama_cpp_x86_semantics() {
        // amax = 127 -> d = 1, id = 1: quants are the inputs rounded half to even.
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5; // ties to even: 2 (llama.cpp's roundf reference would give 3)
        x[2] = -3.5; // -4
        x[3] = 0.49;
        x[4] = -126.6;
        let mut y = [BlockQ8_1 {
            d: 0,
            s: 0,
            qs: [0; 32],
        }];
        quantize_row_q8_1(&x, &mut y);
        assert_eq!(y[0].d, f32_to_f16(1.0));
        assert_eq!(&y[0].qs[..5], &[127, 2, -4, 0, -127]);
        assert_eq!(f16_to_f32(y[0].s), (127 + 2 - 4 - 127) as f32);
    }

    #[test]
    fn fast_rounding_matches_round_ties_even() {
        for i in -300_000..300_000 {
            let v = i as f32 / 2048.0; // includes every .5 tie in range
            assert_eq!(round_ties_even_small(v), v.round_ties_even(), "{v}");
        }
        assert!(round_ties_even_small(f32::NAN).is_nan());
    }

    #[test]
    fn q8_0_scale_and_zero_block() {
        let x: Vec<f32> = (0..64i32)
            .map(|i| if i < 32 { 0.0 } else { (i - 48) as f32 * 0.1 })
            .collect();
        let mut y = [BlockQ8_0 { d: 1, qs: [1; 32] }; 2];
        quantize_row_q8_0(&x, &mut y);
        assert_eq!(y[0], BlockQ8_0 { d: 0, qs: [0; 32] });
        // amax = 1.6 at i = 32 (value -1.6): d = 1.6 / 127, and that element maps to -127.
        assert_eq!(y[1].d, f32_to_f16(1.6 / 127.0));
        assert_eq!(y[1].qs[0], -127);
        assert_eq!(y[1].qs[16], 0);
    }

    #[test]
    fn quantized_acts_match_the_block_functions() {
        let x: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let a = QuantizedActs::quantize(ActFormat::Q8_1, &x, 64).unwrap();
        assert_eq!(a.rows(), 3);
        for j in 0..3 {
            let mut y = [BlockQ8_1 {
                d: 0,
                s: 0,
                qs: [0; 32],
            }; 2];
            quantize_row_q8_1(&x[j * 64..(j + 1) * 64], &mut y);
            for (b, blk) in y.iter().enumerate() {
                assert_eq!(a.block_q8_1(j, b), *blk);
                assert_eq!(
                    a.isum[j * 2 + b],
                    blk.qs.iter().map(|&q| i32::from(q)).sum::<i32>()
                );
            }
        }
        assert!(QuantizedActs::quantize(ActFormat::Q8_0, &x, 48).is_err());
        assert!(QuantizedActs::quantize(ActFormat::Q8_0, &x[..100], 32).is_err());
    }
}
