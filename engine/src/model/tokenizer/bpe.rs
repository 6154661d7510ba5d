//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`: GPT-2, Llama 3, Qwen, SmolLM, StarCoder)
//! on the `tokenizers` crate, with the pre-tokenizer llama.cpp uses for each
//! `tokenizer.ggml.pre`.

use anyhow::{Context, Result, bail};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::metadata::{self, TokenType};
use crate::model::gguf::GgufFile;

/// Llama 3's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): Llama 3's with
/// digits one at a time.
const QWEN2_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5's (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN35`): Qwen2's with combining marks (`\p{M}`)
/// kept with the letters they modify.
const QWEN35_PRETOKENIZER_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT` regexes, applied in turn.
const DEFAULT_PRETOKENIZER_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// The `tokenizer.ggml.pre` values accepted, for the error that names an unknown one.
const SUPPORTED_PRE: &str = "default, gpt2, gpt-2, mpt, olmo, smollm, starcoder, refact, \
                             command-r, llama-bpe, llama3, llama-v3, qwen2, qwen35";

/// A byte-level BPE tokenizer. Its special tokens are registered (so decoding knows to skip
/// them) but never matched in text: `fragments.rs` decides where they are.
pub struct ByteLevelBpe {
    tokenizer: Tokenizer,
}

impl ByteLevelBpe {
    /// From GGUF metadata: tokens and types already read and checked (metadata.rs).
    pub(super) fn from_gguf(
        gguf: &GgufFile,
        pre_kind: &str,
        tokens: &[String],
        types: &[TokenType],
    ) -> Result<Self> {
        let merges = merges(gguf)?;
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // tokenizers' builder panics (it slices past its buffer) on a merge whose result is
        // longer than every token, instead of reporting the missing token: checked here first.
        if let Some((a, b)) = merges
            .iter()
            .find(|(a, b)| !vocab.contains_key(&format!("{a}{b}")))
        {
            bail!(
                "tokenizer.ggml.merges: the merge {a:?} {b:?} makes a token that is not in \
                 tokenizer.ggml.tokens"
            );
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(looks_up_words_first(pre_kind))
            .build()
            .map_err(|e| anyhow::anyhow!("building BPE model: {e}"))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre_kind)?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| t.is_special())
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
        Ok(Self::from_tokenizer(tokenizer))
    }

    /// From a ready `tokenizers` pipeline (a Hugging Face tokenizer.json).
    pub(super) fn from_tokenizer(mut tokenizer: Tokenizer) -> Self {
        tokenizer.set_encode_special_tokens(true);
        Self { tokenizer }
    }

    pub(super) fn token_to_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_to_id(text)
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub(super) fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub(super) fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// Raw bytes of one token: a token can hold part of a UTF-8 character, which its text
    /// shows only as U+FFFD. Special tokens are stored as plain text, not byte-level encoded.
    pub(super) fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        let bytes: Option<Vec<u8>> = piece.chars().map(byte_level_char_to_byte).collect();
        match bytes {
            Some(b) if !special => b,
            _ => piece.into_bytes(),
        }
    }
}

/// Whether llama.cpp adds BOS for this pre-tokenizer when `tokenizer.ggml.add_bos_token` is
/// absent: Llama 3's files rely on it.
pub(super) fn adds_bos_by_default(pre_kind: &str) -> bool {
    matches!(pre_kind, "llama-bpe" | "llama3" | "llama-v3")
}

/// Whether a pre-tokenized word that is itself a token becomes that token before any merge
/// (llama.cpp's `ignore_merges`, tokenizers' `ignore_merges`): Llama 3's tokenizer does, and
/// its merges alone would spell some words differently.
fn looks_up_words_first(pre_kind: &str) -> bool {
    matches!(pre_kind, "llama-bpe" | "llama3" | "llama-v3")
}

/// `tokenizer.ggml.merges`: "left right" pairs, highest priority first.
fn merges(gguf: &GgufFile) -> Result<Vec<(String, String)>> {
    metadata::entries(gguf, "tokenizer.ggml.merges", |v| {
        let s = v.to_string()?;
        let (a, b) = s
            .split_once(' ')
            .with_context(|| format!("{s:?} is not two tokens"))?;
        Ok((a.to_owned(), b.to_owned()))
    })
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` (its `llm_tokenizer_bpe`).
pub(super) fn pre_tokenizer(pre_kind: &str) -> Result<PreTokenizerWrapper> {
    Ok(match pre_kind {
        // GPT-2's regex, which tokenizers' byte-level pre-tokenizer applies itself.
        "gpt2" | "gpt-2" | "mpt" | "olmo" => ByteLevel::new(false, true, true).into(),
        // llama.cpp's default (a file with no or an unknown `tokenizer.ggml.pre`): four
        // regexes, each splitting the pieces of the one before.
        "default" => regexes_then_bytes(&DEFAULT_PRETOKENIZER_REGEXES)?,
        // llama.cpp's `smollm` and the others it groups with it: digits split one by one,
        // then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "llama-bpe" | "llama3" | "llama-v3" => regex_then_bytes(LLAMA3_PRETOKENIZER_REGEX)?,
        "qwen2" => regex_then_bytes(QWEN2_PRETOKENIZER_REGEX)?,
        "qwen35" => regex_then_bytes(QWEN35_PRETOKENIZER_REGEX)?,
        other => {
            bail!("tokenizer.ggml.pre {other:?} is not supported (supported: {SUPPORTED_PRE})")
        }
    })
}

/// Split on `regex` (matches kept as pieces), then map bytes to GPT-2's byte-level symbols.
fn regex_then_bytes(regex: &str) -> Result<PreTokenizerWrapper> {
    regexes_then_bytes(&[regex])
}

/// Split on each of `regexes` in turn (each one's matches and the text between them kept as
/// pieces, as llama.cpp's `unicode_regex_split` does), then map bytes to GPT-2's symbols.
fn regexes_then_bytes(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = regexes
        .iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex((*r).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))
        })
        .collect::<Result<_>>()?;
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(steps).into())
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the others were
/// shifted to U+0100 and up, in order.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if printable(cp) {
        return Some(cp as u8);
    }
    let n = cp.checked_sub(256)?;
    (0u32..=255)
        .filter(|b| !printable(*b))
        .nth(n as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::{byte_level_char_to_byte, pre_tokenizer};

    /// The pieces `pre` cuts `text` into, before byte-level mapping and BPE.
    fn pieces(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(piece, _, _)| piece.to_owned())
        .collect()
    }

    /// llama.cpp's Qwen2 pre-tokenizer takes digits one at a time where Llama 3's takes up to
    /// three; both keep contractions and spaced words whole.
    #[test]
    fn qwen2_splits_digits_singly_and_llama3_in_threes() {
        let q = pieces("qwen2", "I'll pay 12345 now");
        let l = pieces("llama3", "I'll pay 12345 now");
        assert_eq!(q.len(), l.len() + 3, "{q:?} vs {l:?}");
        assert!(
            q.iter()
                .filter(|p| p.len() == 1 && p.chars().all(|c| c.is_ascii_digit()))
                .count()
                == 5,
            "{q:?}"
        );
        assert!(
            pre_tokenizer("qwen3").is_err(),
            "an unknown pre-tokenizer is refused"
        );
    }

    #[test]
    fn byte_level_alphabet_inverts() {
        assert_eq!(byte_level_char_to_byte('A'), Some(b'A'));
        assert_eq!(byte_level_char_to_byte('\u{120}'), Some(b' ')); // 'Ġ'
        assert_eq!(byte_level_char_to_byte('\u{10a}'), Some(b'\n')); // 'Ċ'
        assert_eq!(byte_level_char_to_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_char_to_byte('é'), Some(0xe9));
        assert_eq!(byte_level_char_to_byte('\u{4e00}'), None);
    }
}
