//! Load-time repack of GGUF weight rows into interleaved 16-row tiles, and its exact inverse.
//!
//! A *tile row* holds 16 consecutive weight rows over the full row length (`nb = k / 32`
//! blocks), laid out so that one 64-byte load feeds a 512-bit `vpdpbusd` for all 16 rows:
//!
//! ```text
//! [quants of block 0][quants of block 1] .. [quants of block nb-1]   nb * QB bytes
//! [16 x f16 d of block 0] .. [16 x f16 d of block nb-1]               nb * 32 bytes
//! [16 x f16 m of block 0] .. (Q4_1 only)                              nb * 32 bytes
//! [zero padding to a multiple of 64 bytes]
//! ```
//!
//! Quants of one block are `QB / 64` chunks of 64 bytes; chunk `g` holds, for row `i` of the
//! tile, the four GGUF quant bytes `qs[4g .. 4g + 4]` of that row at bytes `4i .. 4i + 4`.
//! For the 4-bit formats (QB = 256, 4 chunks) a chunk's low nibbles are columns `4g .. 4g+4`
//! and its high nibbles columns `16 + 4g ..`; for Q8_0 (QB = 512, 8 chunks) the bytes are
//! columns `4g .. 4g + 4`, stored XOR 0x80 (the value + 128 as an unsigned byte, which VNNI's
//! unsigned-by-signed product needs; the kernels subtract 128 * Σa). Each 32-bit lane of a
//! chunk is therefore one row's four consecutive weights. The 256-bit kernels read the two
//! 32-byte halves of a chunk (rows 0..8, 8..16).
//!
//! Same bytes as the GGUF rows (d, m and quants, nothing dropped or rounded); rows past
//! `n_out` in the last tile are zero and are never written back.

use crate::KernelError;
use crate::blocks::{ActFormat, QK};

/// Weight rows per tile (one 512-bit lane each).
pub const TILE_ROWS: usize = 16;
/// Alignment of every tile row (a cache line).
const ALIGN: usize = 64;

/// A GGUF weight type these kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// GGML type 2.
    Q4_0,
    /// GGML type 3.
    Q4_1,
    /// GGML type 8.
    Q8_0,
}

impl WeightFormat {
    /// Bytes of one GGUF block (32 weights).
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
    /// The activation format llama.cpp pairs with it.
    pub const fn act_format(self) -> ActFormat {
        match self {
            Self::Q4_1 => ActFormat::Q8_1,
            Self::Q4_0 | Self::Q8_0 => ActFormat::Q8_0,
        }
    }
    /// Quant bytes per block in a tile (16 rows).
    pub(crate) const fn tile_qs_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 256,
            Self::Q8_0 => 512,
        }
    }
    pub(crate) const fn has_min(self) -> bool {
        matches!(self, Self::Q4_1)
    }
    /// Offset of the quants inside a GGUF block.
    const fn qs_offset(self) -> usize {
        match self {
            Self::Q4_1 => 4,
            Self::Q4_0 | Self::Q8_0 => 2,
        }
    }
}

/// Byte offsets inside one tile row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileLayout {
    pub format: WeightFormat,
    pub nb: usize,
    pub d_off: usize,
    pub m_off: usize,
    /// Bytes the kernels read (everything before the padding).
    pub used: usize,
    pub stride: usize,
}

impl TileLayout {
    pub fn new(format: WeightFormat, k: usize) -> Self {
        let nb = k / QK;
        let d_off = nb * format.tile_qs_bytes();
        let m_off = d_off + nb * 32;
        let used = if format.has_min() {
            m_off + nb * 32
        } else {
            m_off
        };
        Self {
            format,
            nb,
            d_off,
            m_off,
            used,
            stride: used.div_ceil(ALIGN) * ALIGN,
        }
    }
}

/// A weight matrix (`n_out` rows of `k`) repacked into tiles; see the module docs.
/// Not `Clone`: a copy would lose the 64-byte alignment of `start`; pack again instead.
#[derive(Debug)]
pub struct PackedMatrix {
    pub(crate) layout: TileLayout,
    n_out: usize,
    k: usize,
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl PackedMatrix {
    /// Repacks `n_out` rows of `k` weights stored back to back in GGUF block layout (what
    /// candle's `QTensor::data()` returns for a 2-D tensor of shape `(n_out, k)`).
    pub fn pack(
        format: WeightFormat,
        gguf: &[u8],
        n_out: usize,
        k: usize,
    ) -> Result<Self, KernelError> {
        if k == 0 || !k.is_multiple_of(QK) {
            return Err(KernelError::RowLength { k });
        }
        let bb = format.block_bytes();
        let expected = n_out * (k / QK) * bb;
        if gguf.len() != expected || n_out == 0 {
            return Err(KernelError::WeightBytes {
                format,
                n_out,
                k,
                expected,
                got: gguf.len(),
            });
        }
        let layout = TileLayout::new(format, k);
        let tiles = n_out.div_ceil(TILE_ROWS);
        let len = tiles * layout.stride;
        // Over-allocate and start at a 64-byte boundary (no unsafe, no allocator API).
        let mut buf = vec![0u8; len + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        let dst = &mut buf[start..start + len];
        let qb = format.tile_qs_bytes();
        let (nb, qo) = (layout.nb, format.qs_offset());
        for r in 0..n_out {
            let (t, i) = (r / TILE_ROWS, r % TILE_ROWS);
            let tile = &mut dst[t * layout.stride..(t + 1) * layout.stride];
            for b in 0..nb {
                let src = &gguf[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                tile[layout.d_off + b * 32 + 2 * i..][..2].copy_from_slice(&src[..2]);
                if format.has_min() {
                    tile[layout.m_off + b * 32 + 2 * i..][..2].copy_from_slice(&src[2..4]);
                }
                for g in 0..qb / 64 {
                    for c in 0..4 {
                        let v = src[qo + 4 * g + c];
                        let v = if format == WeightFormat::Q8_0 {
                            v ^ 0x80
                        } else {
                            v
                        };
                        tile[b * qb + 64 * g + 4 * i + c] = v;
                    }
                }
            }
        }
        Ok(Self {
            layout,
            n_out,
            k,
            buf,
            start,
            len,
        })
    }

    /// The exact inverse of [`PackedMatrix::pack`]: the GGUF bytes back.
    pub fn unpack(&self) -> Vec<u8> {
        let (format, nb) = (self.layout.format, self.layout.nb);
        let (bb, qb, qo) = (
            format.block_bytes(),
            format.tile_qs_bytes(),
            format.qs_offset(),
        );
        let mut out = vec![0u8; self.n_out * nb * bb];
        for r in 0..self.n_out {
            let tile = self.tile_row(r / TILE_ROWS);
            let i = r % TILE_ROWS;
            for b in 0..nb {
                let dst = &mut out[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                dst[..2].copy_from_slice(&tile[self.layout.d_off + b * 32 + 2 * i..][..2]);
                if format.has_min() {
                    dst[2..4].copy_from_slice(&tile[self.layout.m_off + b * 32 + 2 * i..][..2]);
                }
                for g in 0..qb / 64 {
                    for c in 0..4 {
                        let v = tile[b * qb + 64 * g + 4 * i + c];
                        dst[qo + 4 * g + c] = if format == WeightFormat::Q8_0 {
                            v ^ 0x80
                        } else {
                            v
                        };
                    }
                }
            }
        }
        out
    }

    /// The weight format.
    pub fn format(&self) -> WeightFormat {
        self.layout.format
    }
    /// Output rows (weight rows).
    pub fn n_out(&self) -> usize {
        self.n_out
    }
    /// Row length (input features).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Number of 16-row tiles.
    pub fn tiles(&self) -> usize {
        self.n_out.div_ceil(TILE_ROWS)
    }
    /// Bytes of weights a full product streams (the packed size, padding included).
    pub fn packed_bytes(&self) -> usize {
        self.len
    }
    /// Bytes of the same weights in GGUF.
    pub fn gguf_bytes(&self) -> usize {
        self.n_out * self.layout.nb * self.layout.format.block_bytes()
    }
    /// The bytes of tile row `t` (a cache-line aligned slice of `layout.stride` bytes).
    pub(crate) fn tile_row(&self, t: usize) -> &[u8] {
        let s = self.start + t * self.layout.stride;
        &self.buf[s..s + self.layout.stride]
    }
}
