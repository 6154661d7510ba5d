//! Tokenizers of Hugging Face directories: `tokenizer.json`, with BOS, EOS and `add_bos_token`
//! from `tokenizer_config.json` and the stop ids of `generation_config.json`.
//!
//! Two kinds load. Byte-level BPE files (decoder `ByteLevel`: Llama 3, Qwen, SmolLM) run on
//! the `tokenizers` crate as written. SentencePiece-style files (a BPE model with
//! `byte_fallback`, spaces as U+2581: Llama 2, Mistral 7B, TinyLlama) become the engine's own
//! SentencePiece encoder, the one GGUF's `tokenizer.ggml.model = "llama"` uses, so that a
//! directory and the GGUF converted from it tokenize alike: each token's score is the priority
//! of the first merge that makes it. Anything else is refused, naming what the file has.

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::bpe::ByteLevelBpe;
use super::fragments::SpecialToken;
use super::metadata::TokenType;
use super::spm::Spm;
use super::{END_OF_TURN_MARKERS, Encoder, ModelTokenizer, TokenizerParts};
use crate::model::hf::{GenerationConfig, TokenText, TokenizerConfig};

/// SentencePiece's stand-in for a space ("▁").
const SPACE_MARK: &str = "\u{2581}";

/// Most ids a tokenizer.json may name: far above any real vocabulary (Gemma's 262144), low
/// enough that a hostile id cannot size a table.
const MAX_VOCAB: u32 = 1 << 22;

/// The parts of tokenizer.json read to tell the kinds apart and to build a SentencePiece one.
#[derive(Deserialize)]
struct TokenizerFile {
    model: Model,
    #[serde(default)]
    added_tokens: Vec<Added>,
    normalizer: Option<Value>,
    pre_tokenizer: Option<Value>,
    decoder: Option<Value>,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type")]
    kind: Option<String>,
    /// BPE options the engine does not compute (word-piece style affixes, dropout): refused.
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    dropout: Option<f64>,
    #[serde(default)]
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<Merge>,
    #[serde(default)]
    byte_fallback: bool,
    unk_token: Option<String>,
}

/// A merge as tokenizer.json writes it: `"a b"`, or `["a", "b"]` in newer files.
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Text(String),
    Pair([String; 2]),
}

impl Merge {
    fn joined(&self) -> Option<String> {
        match self {
            Self::Text(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Self::Pair([a, b]) => Some(format!("{a}{b}")),
        }
    }
}

#[derive(Deserialize)]
struct Added {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

/// The `type` of a JSON component, or "none".
fn type_of(v: Option<&Value>) -> &str {
    v.and_then(|v| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("none")
}

/// Whether `v` (a component, a `Sequence` of them included) mentions the space mark: the
/// decoders and normalizers of SentencePiece-style files do.
fn mentions_space_mark(v: Option<&Value>) -> bool {
    v.is_some_and(|v| v.to_string().contains(SPACE_MARK))
}

impl ModelTokenizer {
    /// A tokenizer from a Hugging Face directory's files.
    pub fn from_hf(
        json: &[u8],
        cfg: &TokenizerConfig,
        generation: &GenerationConfig,
    ) -> Result<Self> {
        let file: TokenizerFile = serde_json::from_slice(json)
            .context("tokenizer.json is not a tokenizer file (model, added_tokens)")?;
        let decoder = type_of(file.decoder.as_ref());
        if decoder == "ByteLevel" {
            return Self::byte_level_from_hf(json, &file, cfg, generation);
        }
        ensure!(
            file.model.kind.as_deref().unwrap_or("BPE") == "BPE"
                && file.model.byte_fallback
                && mentions_space_mark(file.decoder.as_ref()),
            "tokenizer.json: decoder {decoder:?} with model {:?}: only byte-level BPE (decoder \
             \"ByteLevel\": Llama 3, Qwen, SmolLM) and SentencePiece-style BPE (byte_fallback, \
             spaces as U+2581: Llama 2, Mistral 7B) load from a directory",
            file.model.kind.as_deref().unwrap_or("?")
        );
        Self::sentencepiece_from_hf(file, cfg, generation)
    }

    fn byte_level_from_hf(
        json: &[u8],
        file: &TokenizerFile,
        cfg: &TokenizerConfig,
        generation: &GenerationConfig,
    ) -> Result<Self> {
        // INVARIANT: checked before the tokenizers crate builds the model: its BPE builder
        // panics on a merge longer than every token and trusts the merges' bytes.
        check_bpe_model(&file.model)?;
        let vocab_size = id_count(file)?;
        let mut inner = Tokenizer::from_bytes(json).map_err(|e| anyhow::anyhow!("{e}"))?;
        // Only the model's own pipeline: no padding or truncation settings from the file.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Every added token is special, whatever the file says (Qwen marks `<think>` and the
        // tool-call markers `special: false`): the crate then never matches one in untrusted
        // text, and only template text is cut at them, as for a GGUF's user-defined tokens.
        let added = inner.get_added_tokens_decoder();
        let as_special: Vec<tokenizers::AddedToken> = added
            .values()
            .map(|t| tokenizers::AddedToken {
                special: true,
                ..t.clone()
            })
            .collect();
        inner
            .add_special_tokens(as_special)
            .map_err(|e| anyhow::anyhow!("tokenizer.json's added tokens: {e}"))?;
        let ids = Ids::new(|t| inner.token_to_id(t), vocab_size, cfg, generation)?;
        let specials = added
            .into_iter()
            .map(|(id, tok)| SpecialToken {
                text: tok.content,
                id,
                rstrip: false,
            })
            .collect();
        // Whether the file's post-processor puts BOS first, unless the config says.
        let add_bos = cfg.add_bos_token.unwrap_or_else(|| {
            ids.bos.is_some()
                && inner
                    .encode_fast("a", true)
                    .is_ok_and(|e| e.get_ids().first().copied() == ids.bos)
        });
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        let encoder = Encoder::Bpe(Box::new(ByteLevelBpe::from_tokenizer(inner)));
        Self::from_parts(ids.parts(
            encoder,
            "byte-level",
            vocab_size,
            specials,
            add_bos,
            max_token_bytes,
        ))
    }

    fn sentencepiece_from_hf(
        file: TokenizerFile,
        cfg: &TokenizerConfig,
        generation: &GenerationConfig,
    ) -> Result<Self> {
        let add_space_prefix = space_prefix(&file)?;
        let vocab = Vocabulary::of(&file)?;
        let n = vocab.tokens.len();
        let index: HashMap<&str, u32> = (0u32..)
            .zip(vocab.tokens.iter().map(String::as_str))
            .map(|(i, t)| (t, i))
            .collect();
        let ids = Ids::new(|t| index.get(t).copied(), n, cfg, generation)?;
        // SentencePiece files add BOS unless the config says otherwise (Llama 2, Mistral).
        let add_bos = cfg.add_bos_token.unwrap_or(ids.bos.is_some());
        let specials = super::specials_of(&vocab.tokens, &vocab.types);
        let max_token_bytes = vocab.tokens.iter().map(String::len).max().unwrap_or(1);
        let leading_bos = ids.bos.filter(|_| add_bos);
        let spm = Spm::new(
            vocab.tokens,
            &vocab.types,
            &vocab.scores,
            add_space_prefix,
            leading_bos,
        )
        .context("tokenizer.json")?;
        let encoder = Encoder::Spm(Box::new(spm));
        Self::from_parts(ids.parts(
            encoder,
            "sentencepiece",
            n,
            specials,
            add_bos,
            max_token_bytes,
        ))
    }
}

/// A BPE model the engine computes: type BPE, no word-piece affixes or dropout, and every
/// merge making a token of the vocabulary (checked as for GGUF merges).
fn check_bpe_model(m: &Model) -> Result<()> {
    let kind = m.kind.as_deref().unwrap_or("BPE");
    ensure!(
        kind == "BPE",
        "tokenizer.json: model type {kind:?} is not supported (only BPE)"
    );
    for (key, set) in [
        (
            "continuing_subword_prefix",
            m.continuing_subword_prefix.is_some(),
        ),
        ("end_of_word_suffix", m.end_of_word_suffix.is_some()),
        ("dropout", m.dropout.is_some()),
    ] {
        ensure!(!set, "tokenizer.json: model.{key} is not supported");
    }
    for merge in &m.merges {
        let joined = merge
            .joined()
            .context("tokenizer.json: a merge is not two tokens")?;
        ensure!(
            m.vocab.contains_key(&joined),
            "tokenizer.json: the merge making {joined:?} makes a token that is not in model.vocab"
        );
    }
    Ok(())
}

/// Ids the file names, as a count (the largest id + 1), bounded: what sizes the per-id
/// tables and is compared with the model's embedding rows.
fn id_count(file: &TokenizerFile) -> Result<usize> {
    let added = file.added_tokens.iter().map(|a| &a.id);
    let n = file
        .model
        .vocab
        .values()
        .chain(added)
        .max()
        .map_or(0, |&id| id as usize + 1);
    ensure!(
        n > 0 && n <= MAX_VOCAB as usize,
        "tokenizer.json: the vocabulary has {n} ids (1 to {MAX_VOCAB} supported)"
    );
    Ok(n)
}

/// BOS, EOS and the other stop ids, from tokenizer_config.json and generation_config.json.
struct Ids {
    bos: Option<u32>,
    eos: u32,
    stop: Vec<u32>,
}

impl Ids {
    fn new(
        id_of: impl Fn(&str) -> Option<u32>,
        vocab_size: usize,
        cfg: &TokenizerConfig,
        generation: &GenerationConfig,
    ) -> Result<Self> {
        let named = |key: &str, text: Option<&TokenText>| -> Result<Option<u32>> {
            let Some(t) = text else { return Ok(None) };
            id_of(t.text()).map(Some).with_context(|| {
                format!("tokenizer_config.json: {key} {:?} is not a token", t.text())
            })
        };
        let eos = named("eos_token", cfg.eos_token.as_ref())?
            .or_else(|| generation.eos_ids().first().copied())
            .context("tokenizer_config.json has no eos_token")?;
        let bos = named("bos_token", cfg.bos_token.as_ref())?;
        let mut stop = generation.eos_ids();
        stop.extend(END_OF_TURN_MARKERS.iter().filter_map(|m| id_of(m)));
        ensure!(
            stop.iter()
                .chain([&eos])
                .all(|&id| (id as usize) < vocab_size),
            "generation_config.json: eos_token_id names an id outside the vocabulary"
        );
        Ok(Self { bos, eos, stop })
    }

    /// A tokenizer.json's parts, with these ids.
    fn parts(
        self,
        encoder: Encoder,
        pre_kind: &str,
        vocab_size: usize,
        specials: Vec<SpecialToken>,
        add_bos: bool,
        max_token_bytes: usize,
    ) -> TokenizerParts {
        TokenizerParts {
            encoder,
            model_kind: "tokenizer.json".into(),
            pre_kind: pre_kind.into(),
            vocab_size,
            specials,
            bos_id: self.bos,
            eos_id: self.eos,
            extra_stop_ids: self.stop,
            add_bos,
            max_token_bytes,
        }
    }
}

/// Whether text gets a space before it (SentencePiece's prefix): a `Prepend("▁")` normalizer,
/// or a `Metaspace` pre-tokenizer that prepends. Normalizers that would change the text
/// otherwise (Unicode normalization, lower-casing) are not computed here, so they are refused.
fn space_prefix(file: &TokenizerFile) -> Result<bool> {
    let mut prefix = false;
    let normalizers: Vec<&Value> = match file.normalizer.as_ref() {
        None => Vec::new(),
        Some(n) if type_of(Some(n)) == "Sequence" => n
            .get("normalizers")
            .and_then(Value::as_array)
            .map(|v| v.iter().collect())
            .unwrap_or_default(),
        Some(n) => vec![n],
    };
    for n in normalizers {
        match type_of(Some(n)) {
            "Prepend" if n.get("prepend").and_then(Value::as_str) == Some(SPACE_MARK) => {
                prefix = true
            }
            "Replace" if mentions_space_mark(Some(n)) => {}
            other => bail!("tokenizer.json: normalizer {other:?} is not supported"),
        }
    }
    match type_of(file.pre_tokenizer.as_ref()) {
        "none" => {}
        "Metaspace" => {
            let p = file.pre_tokenizer.as_ref().expect("typed");
            let scheme = p.get("prepend_scheme").and_then(Value::as_str);
            let legacy = p.get("add_prefix_space").and_then(Value::as_bool);
            prefix |= scheme.map_or(legacy.unwrap_or(true), |s| s != "never");
        }
        other => bail!(
            "tokenizer.json: pre_tokenizer {other:?} is not supported for a SentencePiece-style \
             file"
        ),
    }
    Ok(prefix)
}

/// A SentencePiece vocabulary in id order, as GGUF's keys would hold it.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
}

impl Vocabulary {
    fn of(file: &TokenizerFile) -> Result<Self> {
        let m = &file.model;
        check_bpe_model(m)?;
        let added = file.added_tokens.iter().map(|a| (&a.content, a.id));
        let n = id_count(file)?;
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let vocab = m.vocab.iter().map(|(t, &id)| (t, id));
        for (text, id) in vocab.chain(added) {
            match &tokens[id as usize] {
                Some(other) if other != text => {
                    bail!("tokenizer.json: id {id} is both {other:?} and {text:?}")
                }
                _ => tokens[id as usize] = Some(text.clone()),
            }
        }
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(id, t)| t.with_context(|| format!("tokenizer.json: id {id} has no token")))
            .collect::<Result<_>>()?;
        let special: HashMap<&str, bool> = file
            .added_tokens
            .iter()
            .map(|a| (a.content.as_str(), a.special))
            .collect();
        let types = tokens
            .iter()
            .map(|t| match special.get(t.as_str()) {
                Some(true) => TokenType::Control,
                Some(false) => TokenType::UserDefined,
                None if m.unk_token.as_deref() == Some(t.as_str()) => TokenType::Unknown,
                None if is_byte_token(t) => TokenType::Byte,
                None => TokenType::Normal,
            })
            .collect();
        Ok(Self {
            scores: scores(&tokens, &m.merges),
            tokens,
            types,
        })
    }
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// Each token's score: minus the rank of the first merge that makes it (SentencePiece's
/// scores are merge priorities, and tokenizer.json's merges were listed from them); tokens no
/// merge makes rank after every merge.
fn scores(tokens: &[String], merges: &[Merge]) -> Vec<f32> {
    let mut rank: HashMap<String, usize> = HashMap::with_capacity(merges.len());
    for (r, m) in merges.iter().enumerate() {
        if let Some(joined) = m.joined() {
            rank.entry(joined).or_insert(r);
        }
    }
    tokens
        .iter()
        .map(|t| -(rank.get(t).copied().unwrap_or(merges.len()) as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TokenizerConfig {
        serde_json::from_str(r#"{"bos_token":"<s>","eos_token":"</s>"}"#).unwrap()
    }

    /// A Llama-2-style tokenizer.json in miniature, as HF's converter writes it.
    fn llama2_style(normalizer: &str) -> String {
        let mut vocab = vec!["<unk>".to_owned(), "<s>".into(), "</s>".into()];
        vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        vocab.extend(
            ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "llo", "▁hello"].map(String::from),
        );
        let vocab: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i.into()))
            .collect();
        serde_json::json!({
            "added_tokens": [
                {"id": 0, "content": "<unk>", "special": true},
                {"id": 1, "content": "<s>", "special": true},
                {"id": 2, "content": "</s>", "special": true}],
            "normalizer": serde_json::from_str::<Value>(normalizer).unwrap(),
            "pre_tokenizer": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>", "vocab": vocab,
                      "merges": ["▁ h", "l l", "▁h e", "ll o", "▁he llo"]}
        })
        .to_string()
    }

    const LLAMA2_NORMALIZER: &str = r#"{"type":"Sequence","normalizers":[
        {"type":"Prepend","prepend":"▁"},
        {"type":"Replace","pattern":{"String":" "},"content":"▁"}]}"#;

    #[test]
    fn a_sentencepiece_style_file_merges_by_priority_and_falls_back_to_bytes() {
        let json = llama2_style(LLAMA2_NORMALIZER);
        let t = ModelTokenizer::from_hf(json.as_bytes(), &config(), &GenerationConfig::default())
            .unwrap();
        assert_eq!(t.pre_kind, "sentencepiece");
        assert!(t.add_bos);
        // "▁hello" is one token; "!" is spelled by its byte token <0x21> (id 3 + 0x21).
        let ids = t.encode_plain("hello!").unwrap();
        assert_eq!(ids, [1, 268, 3 + 0x21]);
        // As llama.cpp decodes: the space prefix comes off unless BOS leads.
        assert_eq!(t.decode(&ids[1..]).unwrap(), "hello!");
        // Control-token text is the control token only where trusted text has it.
        assert!(t.encode("</s>").unwrap().contains(&2));
        assert!(!t.encode_plain("</s>").unwrap().contains(&2));
    }

    /// A byte-level tokenizer.json in miniature: tokens a, b, ab, <s>, </s>, with `<think>`
    /// added as a non-special token (as Qwen's files do), and `model` fields merged in.
    fn byte_level(model: Value) -> String {
        let mut m = serde_json::json!({"type": "BPE", "merges": ["a b"],
            "vocab": {"a": 0, "b": 1, "ab": 2, "<s>": 3, "</s>": 4, "<think>": 5}});
        for (k, v) in model.as_object().unwrap() {
            m[k] = v.clone();
        }
        let added = |id: u32, content: &str, special: bool| {
            serde_json::json!({"id": id, "content": content, "special": special,
                "single_word": false, "lstrip": false, "rstrip": false, "normalized": false})
        };
        serde_json::json!({
            "added_tokens": [added(3, "<s>", true), added(4, "</s>", true),
                             added(5, "<think>", false)],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": m
        })
        .to_string()
    }

    fn from_json(json: &str) -> Result<ModelTokenizer> {
        ModelTokenizer::from_hf(json.as_bytes(), &config(), &GenerationConfig::default())
    }

    #[test]
    fn an_added_token_marked_not_special_is_still_never_matched_in_untrusted_text() {
        let t = from_json(&byte_level(serde_json::json!({}))).unwrap();
        assert_eq!(t.encode("<think>ab").unwrap(), [5, 2]);
        assert!(!t.encode_plain("<think>ab").unwrap().contains(&5));
    }

    #[test]
    fn hostile_bpe_models_are_refused_before_the_tokenizers_crate_builds_them() {
        for (model, want) in [
            (
                serde_json::json!({"merges": ["ab b"]}),
                "not in model.vocab",
            ),
            (
                serde_json::json!({"continuing_subword_prefix": "##"}),
                "continuing_subword_prefix",
            ),
            (serde_json::json!({"dropout": 0.1}), "dropout"),
            (
                serde_json::json!({"type": "WordPiece"}),
                "model type \"WordPiece\"",
            ),
        ] {
            let err = format!(
                "{:#}",
                from_json(&byte_level(model.clone()))
                    .err()
                    .expect("refused")
            );
            assert!(err.contains(want), "{model}: {err}");
        }
    }

    /// A sparse vocabulary counts up to its largest id, so the loader's comparison with the
    /// model's embedding rows sees every id the tokenizer can produce.
    #[test]
    fn the_vocabulary_size_is_the_largest_id_plus_one() {
        let sparse = byte_level(serde_json::json!({"vocab": {"a": 0, "b": 1, "ab": 2,
            "<s>": 3, "</s>": 4, "<think>": 5, "ba": 1000000}}));
        assert_eq!(from_json(&sparse).unwrap().vocab_size, 1000001);
        let huge = byte_level(serde_json::json!({"vocab": {"a": 0, "b": 1, "ab": 4000000000u32}}));
        assert!(format!("{:#}", from_json(&huge).err().unwrap()).contains("ids (1 to"));
    }

    #[test]
    fn what_the_engine_would_not_compute_is_refused_by_name() {
        let nfkc = llama2_style(r#"{"type":"NFKC"}"#);
        let err = ModelTokenizer::from_hf(nfkc.as_bytes(), &config(), &GenerationConfig::default())
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("normalizer \"NFKC\""),
            "{err:#}"
        );
        let wordpiece =
            r#"{"model":{"type":"WordPiece","vocab":{"a":0}},"decoder":{"type":"WordPiece"}}"#;
        let err = ModelTokenizer::from_hf(
            wordpiece.as_bytes(),
            &config(),
            &GenerationConfig::default(),
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("decoder \"WordPiece\""),
            "{err:#}"
        );
    }
}
