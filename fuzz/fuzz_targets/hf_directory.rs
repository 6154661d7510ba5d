//! Hugging Face directories as the loader reads them: the input is cut at the line `--8<--`
//! into config.json, tokenizer_config.json, generation_config.json, model.safetensors and
//! tokenizer.json, written to a scratch directory, opened as pinned files and parsed by
//! `HfModel::parse` (configuration checks, safetensors headers, expected shapes); a directory
//! that parses has every tensor read through the loader's interface (Llama's Q/K rows
//! interleaved, bf16/f16 read). The safetensors part is also parsed on its own and every
//! tensor read, and the tokenizer parts build a tokenizer that encodes and decodes.
//! Seeded with a valid tiny Llama directory (fuzz/seeds/make_hf_seed.py).
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use bulwark::model::TensorSource;
use bulwark::model::file::ModelFile;
use bulwark::model::hf::{self, HfModel};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    hf::CONFIG_FILE,
    hf::TOKENIZER_CONFIG_FILE,
    hf::GENERATION_CONFIG_FILE,
    hf::WEIGHTS_FILE,
    hf::TOKENIZER_FILE,
];
const SEPARATOR: &[u8] = b"\n--8<--\n";

fn scratch_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("bulwark-fuzz-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < NAMES.len() {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

fn open_all(dir: &std::path::Path) -> BTreeMap<String, ModelFile> {
    NAMES
        .iter()
        .filter_map(|n| Some(((*n).to_owned(), ModelFile::open(&dir.join(n)).ok()?)))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch_dir();
    for n in NAMES {
        let _ = std::fs::remove_file(dir.join(n));
    }
    let parts = parts(data);
    for (name, bytes) in NAMES.iter().zip(&parts) {
        std::fs::write(dir.join(name), bytes).expect("scratch file");
    }
    if let Ok(mut model) = HfModel::parse(open_all(dir)) {
        let cfg = model.config.clone();
        let cpu = candle_core::Device::Cpu;
        let mut names = vec![
            "token_embd.weight".to_owned(),
            "output_norm.weight".to_owned(),
        ];
        names.extend(["output.weight", "rope_freqs.weight"].map(String::from));
        for i in 0..cfg.n_layer.min(2) {
            for t in [
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "ffn_up.weight",
            ] {
                names.push(format!("blk.{i}.{t}"));
            }
        }
        for name in names {
            if model.has_tensor(&name) {
                let t = model
                    .tensor(&name, &cpu)
                    .expect("a tensor the model says it has");
                let _ = t.dequantize(&cpu);
            }
        }
        // On its own thread: a tokenizer per input (see on_own_thread).
        bulwark_fuzz::on_own_thread(|| {
            let _ = bulwark::model::tokenizer::ModelTokenizer::from_hf(
                &model.tokenizer_json,
                &model.tokenizer_config,
                &model.generation,
            )
            .map(|t| {
                let ids = t.encode_plain("ab <s> c").unwrap_or_default();
                let _ = t.decode(&ids);
            });
        });
    }
    if let Some(weights) = parts.get(3) {
        let path = dir.join("alone.safetensors");
        std::fs::write(&path, weights).expect("scratch file");
        if let Ok(mut st) = bulwark::model::safetensors::SafetensorsFile::parse(
            ModelFile::open(&path).expect("scratch file"),
        ) {
            let names: Vec<String> = st.tensors.keys().take(16).cloned().collect();
            for name in names {
                let (e, bytes) = st.bytes(&name).expect("a tensor in the checked header");
                let _ = bulwark::model::safetensors::qtensor(
                    e.dtype,
                    &bytes,
                    &e.shape,
                    &candle_core::Device::Cpu,
                );
            }
        }
    }
});
