//! Quantized matrix kernels for CPU inference: `x · Wᵀ` with GGUF Q4_0, Q4_1 and Q8_0
//! weights and activations quantized to 8 bits exactly as llama.cpp does.
//!
//! # Use
//! 1. At load: [`PackedMatrix::pack`] the tensor's GGUF bytes (a lossless repack into 16-row
//!    tiles, see [`pack`]'s layout; [`PackedMatrix::unpack`] gives the bytes back).
//! 2. Per call: quantize the activation rows once ([`QuantizedActs::quantize_into`], with the
//!    weight's [`WeightFormat::act_format`]), then [`matmul_rows`] on tile-aligned ranges of
//!    output rows, one range per thread of the caller's pool ([`split_rows`] makes balanced
//!    ranges). [`matmul`] does both for a single thread.
//!
//! # Paths
//! [`Isa::detect`] picks, once per process, the best of AVX-512 VNNI (512-bit), AVX-512 VNNI
//! on 256-bit vectors, AVX2 (`vpmaddubsw`) and portable scalar code. Every path computes each
//! output with the same f32 operations in the same order (see `scalar`), so all of them agree
//! bit for bit with [`reference_matmul`]; the tests check this on random data and odd shapes.
//!
//! # Safety
//! `unsafe` and `std::arch` are confined to the `x86` module (the crate denies `unsafe_code`
//! elsewhere); every block carries a `// SAFETY:` comment.

#![deny(unsafe_code)]

mod blocks;
mod f16;
pub mod pack;
mod scalar;
mod vector;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86;

use std::ops::Range;
use std::sync::OnceLock;

pub use blocks::{
    ActFormat, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1, QK, QuantizedActs, quantize_row_q8_0,
    quantize_row_q8_1,
};
pub use f16::{f16_to_f32, f32_to_f16};
pub use pack::{PackedMatrix, TILE_ROWS, WeightFormat};
pub use scalar::reference_matmul;
pub use vector::{axpy_f16, dot_f16, extend_f16, round_to_f16};

/// Activation rows one call takes at most (the batched kernels are sized for prompts and
/// decode batches up to this; larger batches are split by the caller).
pub const MAX_ACT_ROWS: usize = 64;

/// Errors from shape and input checks; the kernels themselves cannot fail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    /// Rows must be whole 32-element blocks.
    #[error("Row length {k} is not a positive multiple of 32")]
    RowLength {
        /// The rejected length.
        k: usize,
    },
    /// The GGUF data does not hold `n_out` rows of `k` in this format.
    #[error("Weight data is {got} bytes; {n_out} rows of {k} in {format:?} take {expected}")]
    WeightBytes {
        /// Format.
        format: WeightFormat,
        /// Rows.
        n_out: usize,
        /// Row length.
        k: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// Activation data is not whole rows.
    #[error("Activation data of {len} values is not whole rows of {k}")]
    ActivationLength {
        /// Values given.
        len: usize,
        /// Row length.
        k: usize,
    },
    /// Activations do not fit these weights.
    #[error(
        "Activations ({rows} rows of {k}, {act:?}) do not fit {format:?} weights with rows of {wk}"
    )]
    ActivationShape {
        /// Activation rows.
        rows: usize,
        /// Activation row length.
        k: usize,
        /// Activation format.
        act: Option<ActFormat>,
        /// Weight format.
        format: WeightFormat,
        /// Weight row length.
        wk: usize,
    },
    /// Too many activation rows for one call.
    #[error("{rows} activation rows; at most {MAX_ACT_ROWS} per call")]
    TooManyRows {
        /// Rows given.
        rows: usize,
    },
    /// The output range is not tile aligned or out of bounds.
    #[error("Output rows {start}..{end} are not a 16-aligned range within 0..{n_out}")]
    RowRange {
        /// Start.
        start: usize,
        /// End.
        end: usize,
        /// Output rows of the matrix.
        n_out: usize,
    },
    /// Output slices do not match the range and activation rows.
    #[error("Output must be {rows} slices of {len}")]
    OutputShape {
        /// Activation rows.
        rows: usize,
        /// Range length.
        len: usize,
    },
    /// The requested instruction set is not available on this CPU.
    #[error("{0:?} is not available on this CPU")]
    IsaUnavailable(Isa),
}

/// A kernel implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C (`vpmaddubsw`).
    Avx2,
    /// AVX-512 VNNI instructions on 256-bit vectors (`vpdpbusd ymm`), 8 rows per vector.
    Avx512Vnni256,
    /// AVX-512 VNNI on 512-bit vectors, 16 rows per vector.
    Avx512Vnni512,
}

impl Isa {
    /// Every implementation, slowest first.
    pub const ALL: [Isa; 4] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512Vnni256,
        Isa::Avx512Vnni512,
    ];

    /// Whether this CPU runs it (detected once, then cached).
    pub fn is_available(self) -> bool {
        static AVAILABLE: OnceLock<[bool; 4]> = OnceLock::new();
        let a = AVAILABLE.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                Isa::ALL.map(x86::has)
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                Isa::ALL.map(|i| i == Isa::Scalar)
            }
        });
        a[self as usize]
    }

    /// The implementation [`matmul_rows`] uses: the fastest available one. 512-bit VNNI is
    /// preferred over 256-bit: on this machine (Zen 4) the kernel benchmark measured it 1.3-2.4x
    /// faster from 4 activation rows up, and within the noise at one row
    /// (bench/RESULTS.md, "Kernels").
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512Vnni512, Isa::Avx2]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// Tile-aligned ranges of output rows splitting `w` into `parts` nearly equal pieces (fewer
/// when there are fewer tiles), for the caller's threads.
pub fn split_rows(w: &PackedMatrix, parts: usize) -> Vec<Range<usize>> {
    let tiles = w.tiles();
    let parts = parts.clamp(1, tiles);
    (0..parts)
        .map(|p| {
            let (a, b) = (tiles * p / parts, tiles * (p + 1) / parts);
            a * TILE_ROWS..(b * TILE_ROWS).min(w.n_out())
        })
        .collect()
}

/// `out[j][r - rows.start] = Σ_c x[j][c] · W[r][c]` for output rows `r` in `rows` (a
/// 16-aligned range; its end may be `n_out`) and every activation row `j`, with `isa`'s
/// kernel. `out` holds one slice of `rows.len()` per activation row, so threads working on
/// different ranges write disjoint memory (see [`split_output`]).
pub fn matmul_rows_with(
    isa: Isa,
    w: &PackedMatrix,
    acts: &QuantizedActs,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    check(w, acts)?;
    let n_out = w.n_out();
    if !rows.start.is_multiple_of(TILE_ROWS)
        || rows.start > rows.end
        || rows.end > n_out
        || (!rows.end.is_multiple_of(TILE_ROWS) && rows.end != n_out)
    {
        return Err(KernelError::RowRange {
            start: rows.start,
            end: rows.end,
            n_out,
        });
    }
    if out.len() != acts.rows || out.iter().any(|o| o.len() != rows.len()) {
        return Err(KernelError::OutputShape {
            rows: acts.rows,
            len: rows.len(),
        });
    }
    if !isa.is_available() {
        return Err(KernelError::IsaUnavailable(isa));
    }
    let mut tile_out = [[0.0f32; TILE_ROWS]; MAX_ACT_ROWS];
    let tile_out = &mut tile_out[..acts.rows];
    for t in rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS) {
        let tr = w.tile_row(t);
        match isa {
            Isa::Scalar => scalar::tile_row(&w.layout, tr, acts, 0, tile_out),
            #[cfg(target_arch = "x86_64")]
            _ => {
                let next = w.tile_row((t + 1).min(w.tiles() - 1));
                x86::tile_row(isa, &w.layout, tr, next, acts, 0, tile_out)
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the scalar path exists off x86-64"),
        }
        let base = t * TILE_ROWS - rows.start;
        let valid = TILE_ROWS.min(rows.end - t * TILE_ROWS);
        for (o, v) in out.iter_mut().zip(tile_out.iter()) {
            o[base..base + valid].copy_from_slice(&v[..valid]);
        }
    }
    Ok(())
}

/// [`matmul_rows_with`] on the detected [`Isa`].
pub fn matmul_rows(
    w: &PackedMatrix,
    acts: &QuantizedActs,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    matmul_rows_with(Isa::detect(), w, acts, rows, out)
}

/// Single-threaded `x · Wᵀ`: quantizes `x` (rows of `w.k()`) into `acts` (a reusable
/// buffer) and writes `out[j * n_out + r]`.
pub fn matmul(
    w: &PackedMatrix,
    x: &[f32],
    acts: &mut QuantizedActs,
    out: &mut [f32],
) -> Result<(), KernelError> {
    acts.quantize_into(w.format().act_format(), x, w.k())?;
    if out.len() != acts.rows * w.n_out() {
        return Err(KernelError::OutputShape {
            rows: acts.rows,
            len: w.n_out(),
        });
    }
    let mut rows: Vec<&mut [f32]> = out.chunks_mut(w.n_out()).collect();
    matmul_rows(w, acts, 0..w.n_out(), &mut rows)
}

/// Splits a row-major output (`act_rows` rows of `n_out`) into, per range, one slice per
/// activation row: the `out` argument of [`matmul_rows`] for each thread. The ranges must be
/// ascending and disjoint (as [`split_rows`] returns them); otherwise this panics.
pub fn split_output<'a>(
    out: &'a mut [f32],
    n_out: usize,
    ranges: &[Range<usize>],
) -> Vec<Vec<&'a mut [f32]>> {
    let mut per_range: Vec<Vec<&'a mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
    for row in out.chunks_mut(n_out) {
        let mut rest = row;
        let mut at = 0;
        for (i, r) in ranges.iter().enumerate() {
            let (_, tail) = rest.split_at_mut(r.start - at);
            let (mine, tail) = tail.split_at_mut(r.len());
            per_range[i].push(mine);
            rest = tail;
            at = r.end;
        }
    }
    per_range
}

fn check(w: &PackedMatrix, acts: &QuantizedActs) -> Result<(), KernelError> {
    if acts.format != Some(w.format().act_format()) || acts.k != w.k() {
        return Err(KernelError::ActivationShape {
            rows: acts.rows,
            k: acts.k,
            act: acts.format,
            format: w.format(),
            wk: w.k(),
        });
    }
    if acts.rows > MAX_ACT_ROWS {
        return Err(KernelError::TooManyRows { rows: acts.rows });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
