//! Tokenizer construction from GGUF metadata (`ModelTokenizer::from_gguf`), structure-aware:
//! one of two bases, the demo model's byte-level BPE metadata (the tiny GGUF's) or a small
//! SentencePiece vocabulary built here (scores, control and unknown tokens, the 256 byte
//! tokens), and the input chooses which keys to keep, replace or retype, how much of the
//! vocabulary, merges and scores to keep, and what to add (hostile token strings, types,
//! scores, merges, ids out of range). The result is written as a real GGUF file and parsed by
//! the engine; a tokenizer that builds then encodes and decodes the input's texts and ids.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bulwark::model::tokenizer::{Detokenizer, ModelTokenizer};
use bulwark_fuzz::{ScratchFile, TINY_GGUF};
use candle_core::quantized::gguf_file::{self, Value};
use libfuzzer_sys::fuzz_target;

/// Tokens added by one input: bounds the cost of one execution, not the parser.
const MAX_EXTRA: usize = 32;

struct Base {
    metadata: Vec<(String, Value)>,
    tokens: Vec<Value>,
    types: Vec<Value>,
    /// `tokenizer.ggml.merges` (BPE), or `tokenizer.ggml.scores` (SentencePiece).
    merges: Vec<Value>,
}

/// A small SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`), in llama.cpp's layout:
/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces scored by merge priority.
fn spm_base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let pieces = [
            "\u{2581}",
            "\u{2581}t",
            "he",
            "\u{2581}the",
            "\u{2581}a",
            "in",
            "er",
            "\u{2581}in",
            "on",
            "re",
            "at",
            "en",
            "\u{2581}s",
            "is",
            "or",
            "es",
            "<|im_start|>",
            "\u{2581}\u{2581}",
            "\u{2581}\u{2581}\u{2581}\u{2581}",
        ];
        let letters = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .map(String::from);
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        tokens.extend(pieces.iter().map(|p| (*p).to_owned()));
        tokens.extend(letters);
        let types: Vec<Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match i {
                0 => 2,
                1 | 2 => 3,
                3..=258 => 6,
                _ if t.starts_with("<|") => 4,
                _ => 1,
            })
            .map(Value::I32)
            .collect();
        let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
        let metadata = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(true)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ];
        Base {
            metadata,
            tokens: tokens.into_iter().map(Value::String).collect(),
            types,
            merges: scores,
        }
    })
}

fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let c = gguf_file::Content::read(&mut Cursor::new(TINY_GGUF)).expect("tiny GGUF");
        let get = |k: &str| match &c.metadata[k] {
            Value::Array(v) => v.clone(),
            _ => unreachable!(),
        };
        let mut metadata: Vec<(String, Value)> = c
            .metadata
            .iter()
            .filter(|(k, _)| {
                k.starts_with("tokenizer.ggml.") || k.as_str() == "general.architecture"
            })
            .filter(|(k, _)| {
                !k.ends_with(".tokens") && !k.ends_with(".token_type") && !k.ends_with(".merges")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.sort_by(|a, b| a.0.cmp(&b.0));
        Base {
            metadata,
            tokens: get("tokenizer.ggml.tokens"),
            types: get("tokenizer.ggml.token_type"),
            merges: get("tokenizer.ggml.merges"),
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Scalar<'a> {
    U32(u32),
    I32(i32),
    U64(u64),
    Bool(bool),
    Str(&'a str),
    F32(f32),
}

impl Scalar<'_> {
    fn value(&self) -> Value {
        match *self {
            Scalar::U32(v) => Value::U32(v),
            Scalar::I32(v) => Value::I32(v),
            Scalar::U64(v) => Value::U64(v),
            Scalar::Bool(v) => Value::Bool(v),
            Scalar::Str(s) => Value::String(s.to_owned()),
            Scalar::F32(v) => Value::F32(v),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Pre<'a> {
    Keep,
    Absent,
    Named(u8),
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    /// Base tokens kept, as a fraction of 256 of the vocabulary (0 keeps them all).
    keep_tokens: u8,
    keep_merges: u8,
    extra_tokens: Vec<(&'a str, i32)>,
    extra_merges: Vec<&'a str>,
    pre: Pre<'a>,
    /// Replace a key of the base metadata (by index) with another value, or drop it.
    replace: Vec<(u8, Option<Scalar<'a>>)>,
    /// Token types: keep in step with the tokens, drop, or cut short.
    types: u8,
    /// A token that is not a string (the array's element type).
    odd_token: Option<Scalar<'a>>,
    texts: Vec<&'a str>,
    ids: Vec<u32>,
    /// The SentencePiece base instead of the BPE one.
    sentencepiece: bool,
    /// Scores of the added tokens (SentencePiece), in turn.
    scores: Vec<f32>,
}

fn prefix(v: &[Value], fraction: u8) -> Vec<Value> {
    if fraction == 0 {
        return v.to_vec();
    }
    v[..v.len() * fraction as usize / 256].to_vec()
}

fn scratch() -> &'static ScratchFile {
    static S: OnceLock<ScratchFile> = OnceLock::new();
    S.get_or_init(|| ScratchFile::new("tokenizer"))
}

fuzz_target!(|input: Input<'_>| {
    let spm = input.sentencepiece;
    let b = if spm { spm_base() } else { base() };
    let mut tokens = prefix(&b.tokens, input.keep_tokens);
    let mut types = prefix(&b.types, input.keep_tokens);
    let mut merges = prefix(&b.merges, input.keep_merges);
    for (i, (t, ty)) in input.extra_tokens.iter().take(MAX_EXTRA).enumerate() {
        tokens.push(Value::String((*t).to_owned()));
        types.push(Value::I32(*ty));
        if spm && !input.scores.is_empty() {
            merges.push(Value::F32(input.scores[i % input.scores.len()]));
        }
    }
    for m in input.extra_merges.iter().take(MAX_EXTRA).filter(|_| !spm) {
        merges.push(Value::String((*m).to_owned()));
    }
    if let Some(odd) = &input.odd_token {
        tokens.push(odd.value());
        types.push(Value::I32(1));
    }
    let mut metadata = b.metadata.clone();
    for (i, v) in &input.replace {
        let i = *i as usize % metadata.len();
        match v {
            Some(v) => metadata[i].1 = v.value(),
            None => metadata[i].1 = Value::Array(Vec::new()),
        }
    }
    match input.pre {
        Pre::Keep => {}
        Pre::Absent => metadata.retain(|(k, _)| k != "tokenizer.ggml.pre"),
        Pre::Named(n) => {
            let name = ["smollm", "gpt2", "default", "llama-bpe", "llama3"][n as usize % 5];
            metadata.retain(|(k, _)| k != "tokenizer.ggml.pre");
            metadata.push(("tokenizer.ggml.pre".into(), Value::String(name.into())));
        }
        Pre::Other(s) => {
            metadata.retain(|(k, _)| k != "tokenizer.ggml.pre");
            metadata.push(("tokenizer.ggml.pre".into(), Value::String(s.into())));
        }
    }
    metadata.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens)));
    match input.types % 4 {
        0 | 1 => metadata.push(("tokenizer.ggml.token_type".into(), Value::Array(types))),
        2 => {}
        _ => {
            types.pop();
            metadata.push(("tokenizer.ggml.token_type".into(), Value::Array(types)));
        }
    }
    let list = if spm {
        "tokenizer.ggml.scores"
    } else {
        "tokenizer.ggml.merges"
    };
    metadata.push((list.into(), Value::Array(merges)));

    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut bytes = Cursor::new(Vec::new());
    if gguf_file::write(&mut bytes, &refs, &[]).is_err() {
        return; // candle cannot write it (an array of mixed types): not a file anyone has
    }
    let Ok(g) = bulwark_fuzz::open_gguf(scratch(), bytes.get_ref()) else {
        return;
    };
    bulwark_fuzz::on_own_thread(|| exercise(&g, &input));
});

/// Build the tokenizer and use it. Run on a thread of its own: the tokenizers crate caches
/// words per BPE instance in thread-local maps it never frees when the instance is dropped,
/// so a process that builds a tokenizer per input would otherwise grow without bound (the
/// server builds one).
fn exercise(g: &bulwark::model::gguf::GgufFile, input: &Input<'_>) {
    let Ok(t) = ModelTokenizer::from_gguf(g) else {
        return;
    };
    let texts: Vec<&str> = input.texts.iter().take(8).copied().collect();
    for text in &texts {
        let _ = t.encode(text);
        if let Ok(ids) = t.encode_plain(text) {
            let _ = t.decode(&ids);
        }
    }
    let rendered = texts.concat();
    let _ = t.encode_chat(&rendered, &texts);
    let mut detok = Detokenizer::new();
    for &id in input.ids.iter().take(64) {
        let _ = t.is_special(id);
        let _ = t.token_text(id);
        let _ = t.token_bytes(id);
        let _ = detok.push(&t, id);
    }
}
