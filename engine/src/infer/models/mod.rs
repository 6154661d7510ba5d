//! Model architectures, one file each, in candle's shape.

pub mod llama;
