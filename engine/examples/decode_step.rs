//! Times the model alone, without the server: a prompt pass, then single-token decode steps
//! for one sequence and for a batch of sequences. `cargo run --release --example decode_step --
//! MODEL.gguf [f32|f16|quantized] [batch]`. Used by bench/RESULTS.md's per-step figures.

use std::time::Instant;

use anyhow::{Context, Result};
use bulwark::infer::models::llama::{BatchItem, LlamaModel};
use bulwark::model::arch::WeightFormat;
use bulwark::model::gguf::GgufFile;

fn main() -> Result<()> {
    // As the server runs it: on a thread of the compute pool.
    bulwark::infer::scheduler::on_compute_pool(run)
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: decode_step MODEL.gguf [format] [batch]")?;
    let format = match args.next().as_deref().unwrap_or("quantized") {
        "f32" => WeightFormat::F32,
        "f16" => WeightFormat::F16,
        _ => WeightFormat::Quantized,
    };
    let batch: usize = args.next().map_or(Ok(1), |b| b.parse())?;
    let mut gguf = GgufFile::open_unverified(std::path::Path::new(&path))?;
    let cfg = bulwark::model::arch::LlamaConfig::from_gguf(&gguf)?;
    let model = LlamaModel::load(&mut gguf, cfg, format, &candle_core::Device::Cpu, 2048)?;
    let prompt: Vec<u32> = (0..64).map(|i| 100 + i * 7).collect();
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    let t = Instant::now();
    for c in caches.iter_mut() {
        model.forward(&mut [BatchItem {
            tokens: &prompt,
            cache: c,
        }])?;
    }
    let prefill = t.elapsed().as_secs_f64() / batch as f64;
    println!(
        "prompt pass: {:.1} ms for 64 tokens ({:.0} tok/s)",
        prefill * 1e3,
        64.0 / prefill
    );
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let t = Instant::now();
    for s in 0..steps {
        let tok = [200 + s as u32];
        let mut items: Vec<_> = caches
            .iter_mut()
            .map(|c| BatchItem {
                tokens: &tok,
                cache: c,
            })
            .collect();
        model.forward(&mut items)?;
    }
    let per = t.elapsed().as_secs_f64() / steps as f64;
    println!(
        "decode, batch {batch}: {:.2} ms/step, {:.1} tok/s",
        per * 1e3,
        batch as f64 / per
    );
    Ok(())
}
