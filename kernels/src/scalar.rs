//! The scalar reference (straight from GGUF rows) and the portable scalar kernel (on tiles).
//!
//! Every path computes each output with the same f32 operations in the same order, so the
//! SIMD paths match these bit for bit:
//!
//! ```text
//! acc = 0; accm = 0
//! for each block b:  sumi  = Σ w_q * a_q                (exact i32; w_q = q - 8, q, or i8)
//!                    acc   = fma(dx * dy, sumi as f32, acc)
//!                    accm  = fma(mx, sy, accm)          (Q4_1 only)
//! out = acc + accm  (Q4_1)  or  acc
//! ```
//!
//! `sumi` fits an f32 exactly (|sumi| <= 32 * 128 * 127 < 2^24), `dx * dy` is one rounding and
//! `fma` one more, whether done in a lane of a vector or here.

use crate::blocks::{QK, QuantizedActs, nibble};
use crate::f16::f16_to_f32;
use crate::pack::{TILE_ROWS, TileLayout, WeightFormat};

/// The signed weight value of element `c` of GGUF block `blk` (Q4_0: q - 8; Q4_1: q).
fn weight_q(format: WeightFormat, blk: &[u8], c: usize) -> i32 {
    match format {
        WeightFormat::Q4_0 => {
            i32::from(nibble(blk[2..18].try_into().expect("18-byte block"), c)) - 8
        }
        WeightFormat::Q4_1 => i32::from(nibble(blk[4..20].try_into().expect("20-byte block"), c)),
        WeightFormat::Q8_0 => i32::from(blk[2 + c] as i8),
    }
}

/// Reference `x · Wᵀ` from GGUF bytes: `out[j * n_out + r]`. Slow and obvious.
pub fn reference_matmul(
    format: WeightFormat,
    gguf: &[u8],
    n_out: usize,
    acts: &QuantizedActs,
) -> Vec<f32> {
    let (k, rows) = (acts.k, acts.rows);
    let nb = k / QK;
    let bb = format.block_bytes();
    assert_eq!(gguf.len(), n_out * nb * bb);
    let mut out = vec![0.0; rows * n_out];
    for j in 0..rows {
        for r in 0..n_out {
            let (mut acc, mut accm) = (0.0f32, 0.0f32);
            for b in 0..nb {
                let blk = &gguf[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                let a = &acts.qs[(j * nb + b) * QK..(j * nb + b + 1) * QK];
                let sumi: i32 = (0..QK)
                    .map(|c| weight_q(format, blk, c) * i32::from(a[c]))
                    .sum();
                let dx = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
                acc = (dx * acts.d[j * nb + b]).mul_add(sumi as f32, acc);
                if format.has_min() {
                    let mx = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                    accm = mx.mul_add(acts.s[j * nb + b], accm);
                }
            }
            out[j * n_out + r] = if format.has_min() { acc + accm } else { acc };
        }
    }
    out
}

/// Portable kernel over one tile row for activation rows `j0 .. j0 + out.len()`.
pub(crate) fn tile_row(
    l: &TileLayout,
    tr: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    out: &mut [[f32; TILE_ROWS]],
) {
    let nb = l.nb;
    let qb = l.format.tile_qs_bytes();
    let f16_at = |off: usize| f16_to_f32(u16::from_le_bytes([tr[off], tr[off + 1]]));
    for (n, o) in out.iter_mut().enumerate() {
        let j = j0 + n;
        let mut acc = [0.0f32; TILE_ROWS];
        let mut accm = [0.0f32; TILE_ROWS];
        for b in 0..nb {
            let a = &acts.qs[(j * nb + b) * QK..(j * nb + b + 1) * QK];
            let q = &tr[b * qb..(b + 1) * qb];
            let (dy, sy) = (acts.d[j * nb + b], acts.s[j * nb + b]);
            for i in 0..TILE_ROWS {
                let mut sumi = 0i32;
                for g in 0..qb / 64 {
                    for c in 0..4 {
                        let byte = q[64 * g + 4 * i + c];
                        match l.format {
                            WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
                                let off = if l.format == WeightFormat::Q4_0 { 8 } else { 0 };
                                sumi += (i32::from(byte & 0x0f) - off) * i32::from(a[4 * g + c]);
                                sumi += (i32::from(byte >> 4) - off) * i32::from(a[16 + 4 * g + c]);
                            }
                            WeightFormat::Q8_0 => {
                                sumi += i32::from((byte ^ 0x80) as i8) * i32::from(a[4 * g + c]);
                            }
                        }
                    }
                }
                let dx = f16_at(l.d_off + b * 32 + 2 * i);
                acc[i] = (dx * dy).mul_add(sumi as f32, acc[i]);
                if l.format.has_min() {
                    accm[i] = f16_at(l.m_off + b * 32 + 2 * i).mul_add(sy, accm[i]);
                }
            }
        }
        for i in 0..TILE_ROWS {
            o[i] = if l.format.has_min() {
                acc[i] + accm[i]
            } else {
                acc[i]
            };
        }
    }
}
