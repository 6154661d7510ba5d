//! The token embedding: a lookup of one row per token.
//!
//! A lookup reads a handful of rows per step, so there is no reason to hold the whole table
//! dequantized: in the formats the `kernels` crate knows (Q4_0, Q4_1, Q8_0) the rows stay as
//! the file's blocks and are dequantized when looked up, exactly as ggml's `get_rows` does.
//! For the demo model that is 30 MB instead of 113 MB of f32. Other formats are dequantized
//! once at load.

use anyhow::{Result, ensure};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub(super) enum Embedding {
    /// `[vocab, hidden]` dequantized at load.
    Dense(Tensor),
    /// The file's blocks, row-major: `row_bytes` per token.
    Blocks {
        format: GgmlDType,
        data: Vec<u8>,
        row_bytes: usize,
        hidden: usize,
    },
}

impl Embedding {
    /// Keeps `q`'s blocks when `blocks` is asked for and the format allows, else dequantizes.
    pub(super) fn load(q: &QTensor, blocks: bool, device: &Device) -> Result<Self> {
        let (vocab, hidden) = q.shape().dims2()?;
        let format = q.dtype();
        let block_bytes = match format {
            GgmlDType::Q4_0 => 18,
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            _ => 0,
        };
        if !blocks || block_bytes == 0 || !device.is_cpu() || !hidden.is_multiple_of(32) {
            return Ok(Self::Dense(q.dequantize(device)?));
        }
        let data = q.data()?.into_owned();
        let row_bytes = hidden / 32 * block_bytes;
        ensure!(
            data.len() == vocab * row_bytes,
            "token_embd.weight holds {} bytes, not {vocab} rows of {row_bytes}",
            data.len()
        );
        Ok(Self::Blocks {
            format,
            data,
            row_bytes,
            hidden,
        })
    }

    /// The rows of `ids`: `[ids.len(), hidden]`.
    pub(super) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(table) => {
                let ids_t = Tensor::from_vec(ids.to_vec(), ids.len(), device)?;
                Ok(table.index_select(&ids_t, 0)?)
            }
            Self::Blocks {
                format,
                data,
                row_bytes,
                hidden,
            } => {
                let mut out = Vec::with_capacity(ids.len() * hidden);
                for &id in ids {
                    let at = id as usize * row_bytes;
                    let row = data.get(at..at + row_bytes).ok_or_else(|| {
                        anyhow::anyhow!("token id {id} is outside the embedding table")
                    })?;
                    dequantize_row(*format, row, &mut out);
                }
                Ok(Tensor::from_vec(out, (ids.len(), *hidden), device)?)
            }
        }
    }
}

/// Appends the dequantized values of one row of blocks (`format` is one `load` accepted).
fn dequantize_row(format: GgmlDType, row: &[u8], out: &mut Vec<f32>) {
    match format {
        GgmlDType::Q4_0 => row.chunks_exact(18).for_each(|b| {
            out.extend(kernels::BlockQ4_0::from_bytes(b.try_into().expect("18 bytes")).dequantize())
        }),
        GgmlDType::Q4_1 => row.chunks_exact(20).for_each(|b| {
            out.extend(kernels::BlockQ4_1::from_bytes(b.try_into().expect("20 bytes")).dequantize())
        }),
        _ => row.chunks_exact(34).for_each(|b| {
            out.extend(kernels::BlockQ8_0::from_bytes(b.try_into().expect("34 bytes")).dequantize())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looking rows up from the blocks gives exactly candle's dequantization of the table.
    #[test]
    fn block_rows_equal_the_dequantized_table() {
        let dev = Device::Cpu;
        let table: Vec<f32> = (0..8 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let t = Tensor::from_vec(table, (8, 64), &dev).unwrap();
        for format in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&t, format).unwrap();
            let dense = Embedding::load(&q, false, &dev).unwrap();
            let blocks = Embedding::load(&q, true, &dev).unwrap();
            assert!(matches!(blocks, Embedding::Blocks { .. }), "{format:?}");
            let ids = [7, 0, 3, 3];
            let a: Vec<Vec<f32>> = dense.lookup(&ids, &dev).unwrap().to_vec2().unwrap();
            let b: Vec<Vec<f32>> = blocks.lookup(&ids, &dev).unwrap().to_vec2().unwrap();
            assert_eq!(a, b, "{format:?}");
            assert!(blocks.lookup(&[8], &dev).is_err(), "an id past the table");
        }
    }
}
