//! Model architectures, one file each, in candle's shape; `packed` is the CPU path their
//! layers take when the weights stay quantized.

mod embedding;
pub mod llama;
mod packed;
