//! Hugging Face directories (config.json, safetensors, tokenizer.json) against the GGUF files
//! they were written from (tests/models/make_hf_fixture.py, run by scripts/test.sh): the
//! same weights must give the same tokens; a directory is pinned file by file, and a file
//! that is altered, unpinned or names custom code is refused before anything is parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use bulwark::digest::Sha256;
use bulwark::infer::models::llama::{BatchItem, LlamaModel};
use bulwark::model::ModelInfo;
use bulwark::model::arch::WeightFormat;
use bulwark::model::pin::{OpenedModel, Pin};

use crate::util;

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("BULWARK_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/bulwark/fixtures")
        })
        .join(name);
    assert!(
        dir.join("config.json").exists(),
        "{} missing: run tests/models/make_hf_fixture.py (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The pins `bulwark model hash DIR` prints.
fn pins_of(dir: &Path) -> BTreeMap<String, Sha256> {
    bulwark::model::pin::directory_pins(dir).unwrap()
}

fn load(path: &Path, pin: Pin) -> anyhow::Result<(ModelInfo, LlamaModel)> {
    let opened = OpenedModel::open(path, &pin)?;
    bulwark::infer::load::load(
        opened,
        &pin,
        "m",
        Some(256),
        WeightFormat::F32,
        &Device::Cpu,
        None,
    )
}

fn load_gguf(path: &Path) -> (ModelInfo, LlamaModel) {
    let sha = bulwark::model::file::sha256_file(path).unwrap();
    load(path, Pin::File(sha)).unwrap()
}

/// Greedy ids after `prompt`, and the first step's logits.
fn greedy(model: &LlamaModel, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&mut [BatchItem {
            tokens: prompt,
            cache: &mut cache,
        }])
        .unwrap()
        .remove(0);
    let first = logits.clone();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(&logits);
        out.push(next);
        logits = model
            .forward(&mut [BatchItem {
                tokens: &[next],
                cache: &mut cache,
            }])
            .unwrap()
            .remove(0);
    }
    (out, first)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &x)| if x > best.1 { (i, x) } else { best },
        )
        .0 as u32
}

fn chat_ids(info: &ModelInfo, question: &str) -> Vec<u32> {
    let msg = bulwark::model::template::ChatMessage {
        role: "user".into(),
        content: question.into(),
    };
    let rendered = info
        .template
        .as_ref()
        .unwrap()
        .render(&[msg], true)
        .unwrap();
    info.tokenizer.encode_chat(&rendered, &[question]).unwrap()
}

/// The demo model, written out as a sharded f32 directory, is the GGUF's f32 model: the same
/// prompt ids, the same first logits to the bit, the same greedy tokens.
#[test]
fn the_demo_models_hf_directory_gives_the_ggufs_tokens() {
    let dir = fixture("smollm2-hf");
    let (g_info, gguf) = load_gguf(&util::model_path());
    let (h_info, hf) = load_pinned(&dir);
    assert_eq!(h_info.tokenizer.eos_id, g_info.tokenizer.eos_id);
    assert_eq!(h_info.tokenizer.stop_ids, g_info.tokenizer.stop_ids);
    for q in [
        "What is the capital of France? Answer in one sentence.",
        "Why do cats purr? 12345 <|im_start|>",
    ] {
        let ids = chat_ids(&g_info, q);
        assert_eq!(chat_ids(&h_info, q), ids, "prompt ids of {q:?}");
        let (g_tokens, g_first) = greedy(&gguf, &ids, 12);
        let (h_tokens, h_first) = greedy(&hf, &ids, 12);
        assert_eq!(h_first, g_first, "first logits of {q:?}");
        assert_eq!(h_tokens, g_tokens, "greedy tokens of {q:?}");
        eprintln!("{q:?}: {:?}", g_info.tokenizer.decode(&g_tokens).unwrap());
    }
}

/// Qwen2 (Q/K/V biases), Qwen3 (Q/K norms), Llama 3.1 (rope scaling, here from config.json's
/// `rope_scaling` instead of `rope_freqs.weight`) and SentencePiece Llama directories from the
/// tiny fixtures: the GGUF's f32 logits to the bit.
#[test]
fn every_architectures_hf_directory_gives_the_ggufs_logits() {
    for name in ["qwen2", "qwen3", "llama3-rope", "llama-spm"] {
        let dir = fixture(&format!("{name}-hf"));
        let gguf_path = dir.parent().unwrap().join(format!("{name}.gguf"));
        let (_, gguf) = load_gguf(&gguf_path);
        let (_, hf) = load_pinned(&dir);
        let ids = [1, 504, 3458, 314, 216, 28, 29, 30];
        let (g_tokens, g_first) = greedy(&gguf, &ids, 6);
        let (h_tokens, h_first) = greedy(&hf, &ids, 6);
        assert_eq!(h_first, g_first, "{name}: first logits");
        assert_eq!(h_tokens, g_tokens, "{name}: greedy tokens");
    }
}

/// bf16 and f16 directories (the tiny llama fixture's weights rounded to each) read as the f32
/// directory of the same rounded values: the same logits to the bit.
#[test]
fn bf16_and_f16_directories_read_as_their_values_in_f32() {
    for half in ["bf16", "f16"] {
        let (_, stored) = load_pinned(&fixture(&format!("llama-hf-{half}")));
        let (_, exact) = load_pinned(&fixture(&format!("llama-hf-{half}-as-f32")));
        let ids = [1, 504, 3458, 314, 216];
        let (s_tokens, s_first) = greedy(&stored, &ids, 4);
        let (e_tokens, e_first) = greedy(&exact, &ids, 4);
        assert_eq!(s_first, e_first, "{half}: first logits");
        assert_eq!(s_tokens, e_tokens, "{half}: greedy tokens");
    }
}

fn load_pinned(dir: &Path) -> (ModelInfo, LlamaModel) {
    load(dir, Pin::Files(pins_of(dir))).unwrap()
}

/// A copy of the directory's small files, with the shards linked, for tampering.
fn copy_of(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let to = tmp.path().join(p.file_name().unwrap());
        if p.extension().is_some_and(|e| e == "safetensors") {
            std::os::unix::fs::symlink(&p, &to).unwrap();
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
    tmp
}

fn refusal(dir: &Path, pins: BTreeMap<String, Sha256>) -> String {
    match load(dir, Pin::Files(pins)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn an_altered_file_is_refused_before_parsing_naming_it() {
    let src = fixture("smollm2-hf");
    let pins = pins_of(&src);
    let tmp = copy_of(&src);
    // One byte of the tokenizer changed, still valid JSON: only the pin can tell.
    let path = tmp.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("\"Ġ", "\"Ċ", 1);
    std::fs::write(&path, text).unwrap();
    let err = refusal(tmp.path(), pins);
    assert!(
        err.contains("tokenizer.json") && err.contains("refusing to load it"),
        "{err}"
    );
}

#[test]
fn a_file_read_but_not_pinned_is_refused_naming_it() {
    let src = fixture("smollm2-hf");
    for name in [
        "tokenizer.json",
        "model-00002-of-00002.safetensors",
        "config.json",
    ] {
        let mut pins = pins_of(&src);
        pins.remove(name);
        let err = refusal(&src, pins);
        assert!(
            err.contains(&format!("model.files has no entry for {name}")),
            "{name}: {err}"
        );
    }
}

/// A directory that asks for custom code is refused by the key that asks for it, and the code
/// is never run: it would have written a file.
#[test]
fn custom_code_in_a_directory_is_refused_and_never_run() {
    let src = fixture("smollm2-hf");
    let tmp = copy_of(&src);
    let marker = tmp.path().join("executed");
    std::fs::write(
        tmp.path().join("modeling_evil.py"),
        format!(
            "open({:?}, 'w').write('ran')\n",
            marker.display().to_string()
        ),
    )
    .unwrap();
    let config = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    cfg["auto_map"] = serde_json::json!({"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"});
    std::fs::write(&config, cfg.to_string()).unwrap();
    let mut pins = pins_of(tmp.path());
    pins.insert(
        "modeling_evil.py".into(),
        bulwark::model::file::sha256_file(&tmp.path().join("modeling_evil.py")).unwrap(),
    );
    let err = refusal(tmp.path(), pins);
    assert!(err.contains("auto_map"), "{err}");
    assert!(!marker.exists(), "code from the model directory ran");
}

/// A SentencePiece-style tokenizer.json (Llama 2's vocabulary, written as transformers'
/// converter writes it) gives llama.cpp's ids on llama.cpp's own test vectors, as the GGUF
/// does, and the same prompt ids as the GGUF for a chat.
#[test]
fn a_sentencepiece_tokenizer_json_tokenizes_as_llama_cpp_does() {
    let Some(vocabs) = crate::vocab::vocab_dir() else {
        return;
    };
    let dir = fixture("llama-spm-hf");
    let (info, _) = load_pinned(&dir);
    let t = &info.tokenizer;
    assert_eq!(t.pre_kind, "sentencepiece");
    let cases = crate::vocab::vectors(&vocabs, "llama-spm");
    for (i, (input, want)) in cases.iter().enumerate() {
        assert_eq!(
            &crate::vocab::tokenize(t, input),
            want,
            "input {i} {input:?}: ours (left) differs from llama.cpp's"
        );
    }
    let (g_info, _) = load_gguf(&dir.parent().unwrap().join("llama-spm.gguf"));
    for q in [
        "Hello there",
        "What is 12 + 30? Answer [INST] in </s> words.",
    ] {
        assert_eq!(chat_ids(&info, q), chat_ids(&g_info, q), "{q:?}");
    }
}
