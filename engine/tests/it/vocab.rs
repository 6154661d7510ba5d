//! Tokenization against llama.cpp's own test vectors: the vocabulary-only GGUFs that llama.cpp
//! ships with, for each, inputs and the token ids llama.cpp gives them
//! (`models/ggml-vocab-<name>.gguf.inp` and `.out`, checked by its tests/test-tokenizer-0.cpp).
//! tests/models/fetch-vocabs.sh fetches them; BULWARK_VOCABS names the directory.
//!
//! llama.cpp tokenizes the vectors with `add_special = false` (no BOS) and
//! `parse_special = false` (control tokens are text, user-defined tokens are still cut out).
//! No input of the families below holds a control or user-defined token's text, so
//! `encode_plain` without its BOS is that call.
//!
//! Covered: SentencePiece (`llama-spm`: Llama 2; `phi-3`, whose special tokens strip the
//! whitespace after them) and byte-level BPE with the pre-tokenizers `llama-bpe` (Llama 3),
//! `qwen2`, `qwen35`, `gpt-2`, and `starcoder`, `refact`, `command-r` (SmolLM's digit rule).
//! Skipped, each refused by name at load: `deepseek-llm`, `deepseek-coder` and `falcon`
//! (pre-tokenizers of several regexes with hand-written character classes, not ported),
//! `mpt` (its inputs hold runs of spaces that are user-defined tokens, which llama.cpp cuts out
//! even of untrusted text and Bulwark does not), `bert-bge` (WordPiece), `gemma-4` (its own
//! model type) and `nomic-bert-moe` (Unigram). `aquila`, `baichuan` and `gpt-neox` come without
//! test vectors.

use std::path::PathBuf;

use bulwark::model::gguf::GgufFile;
use bulwark::model::tokenizer::ModelTokenizer;

/// The families checked, by the name in `ggml-vocab-<name>.gguf`.
const FAMILIES: &[&str] = &[
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "gpt-2",
    "starcoder",
    "refact",
    "command-r",
];

/// What separates the inputs of a `.inp` file (tests/test-tokenizer-0.cpp).
const INPUT_SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// The vocabulary directory, or None (with a message) when BULWARK_VOCABS is unset.
pub(crate) fn vocab_dir() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("BULWARK_VOCABS") else {
        eprintln!(
            "skipped: BULWARK_VOCABS is unset; run `export BULWARK_VOCABS=$(tests/models/fetch-vocabs.sh)` \
             to check tokenization against llama.cpp's test vectors"
        );
        return None;
    };
    Some(PathBuf::from(dir))
}

/// The inputs and llama.cpp's ids for each, as test-tokenizer-0.cpp reads them.
pub(crate) fn vectors(dir: &std::path::Path, family: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{family}.gguf"));
    let read = |ext: &str| {
        let path = base.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let raw = read("inp");
    let mut inputs: Vec<&str> = raw.split(INPUT_SEPARATOR).collect();
    // The file ends with a separator, after which the reader stops.
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let expected: Vec<Vec<u32>> = read("out")
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        expected.len(),
        "{family}: .inp and .out disagree"
    );
    inputs
        .into_iter()
        .map(str::to_owned)
        .zip(expected)
        .collect()
}

fn load(dir: &std::path::Path, family: &str) -> ModelTokenizer {
    let path = dir.join(format!("ggml-vocab-{family}.gguf"));
    // A vocabulary-only file: no tensors, so nothing to pin but the sdist it came from
    // (fetch-vocabs.sh checks that one's sha256).
    let gguf = GgufFile::open_unverified(&path).unwrap_or_else(|e| panic!("{family}: {e:#}"));
    ModelTokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{family}: {e:#}"))
}

/// llama.cpp's `tokenize(text, add_special = false, parse_special = false)`.
pub(crate) fn tokenize(t: &ModelTokenizer, text: &str) -> Vec<u32> {
    let mut ids = t.encode_plain(text).unwrap();
    if t.add_bos && t.bos_id.is_some() && ids.first() == t.bos_id.as_ref() {
        ids.remove(0);
    }
    ids
}

#[test]
fn every_family_tokenizes_as_llama_cpp_does() {
    let Some(dir) = vocab_dir() else { return };
    for family in FAMILIES {
        let t = load(&dir, family);
        let cases = vectors(&dir, family);
        for (i, (input, want)) in cases.iter().enumerate() {
            let got = tokenize(&t, input);
            assert_eq!(
                &got, want,
                "{family}: input {i} {input:?}: ours (left) differs from llama.cpp's"
            );
        }
        eprintln!("{family}: {} vectors match llama.cpp", cases.len());
    }
}

/// Decoding gives the input back: byte-level BPE and SentencePiece with byte fallback lose
/// nothing, and llama.cpp takes the space prefix off the first token again.
#[test]
fn every_family_decodes_what_it_encoded() {
    let Some(dir) = vocab_dir() else { return };
    for family in FAMILIES {
        let t = load(&dir, family);
        for (i, (input, _)) in vectors(&dir, family).iter().enumerate() {
            let ids = tokenize(&t, input);
            assert_eq!(
                &t.decode(&ids).unwrap(),
                input,
                "{family}: input {i} {ids:?}"
            );
        }
    }
}

/// llama.cpp's default pre-tokenizer (a file naming none): its GPT-2 vocabulary with
/// `tokenizer.ggml.pre` set to "default" in memory, against the ids llama.cpp's `llama-tokenize`
/// gives for the same inputs (tests/models/make_pre_default_vectors.py made the file).
#[test]
fn the_default_pre_tokenizer_tokenizes_as_llama_cpp_does() {
    let Some(dir) = vocab_dir() else { return };
    #[derive(serde::Deserialize)]
    struct Vectors {
        vocab: String,
        pre: String,
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }
    let path = crate::util::repo_root().join("engine/tests/data/vocab-pre-default.json");
    let v: Vectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut gguf = GgufFile::open_unverified(&dir.join(&v.vocab)).unwrap();
    gguf.content.metadata.insert(
        "tokenizer.ggml.pre".into(),
        candle_core::quantized::gguf_file::Value::String(v.pre.clone()),
    );
    let t = ModelTokenizer::from_gguf(&gguf).unwrap();
    for (i, case) in v.cases.iter().enumerate() {
        assert_eq!(
            tokenize(&t, &case.text),
            case.ids,
            "input {i} {:?}: ours (left) differs from llama.cpp's",
            case.text
        );
    }
    eprintln!("default: {} vectors match llama.cpp", v.cases.len());
}
