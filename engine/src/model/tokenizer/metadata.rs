//! The `tokenizer.ggml.*` keys every GGUF tokenizer has, read and checked once: a key with the
//! wrong type, a length that disagrees with the token list or an id outside it is refused with
//! the key's name, so hostile metadata never reaches an index operation.

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::Value;

use crate::model::gguf::GgufFile;

pub(super) const TOKENS: &str = "tokenizer.ggml.tokens";
pub(super) const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub(super) const SCORES: &str = "tokenizer.ggml.scores";
pub(super) const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub(super) const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub(super) const EOT_ID: &str = "tokenizer.ggml.eot_token_id";

/// llama.cpp's token types (`llama_token_type`), as `tokenizer.ggml.token_type` stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    /// `<0xXX>`: one raw byte, for text no other token spells (SentencePiece byte fallback).
    Byte,
}

impl TokenType {
    fn from_gguf(value: i32) -> Option<Self> {
        Some(match value {
            0 => Self::Undefined,
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// The tokens llama.cpp cuts out of trusted text before tokenizing the rest (its special
    /// token cache): control, user-defined and unknown. No other text ever becomes one.
    pub(super) fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined | Self::Unknown)
    }
}

/// `tokenizer.ggml.tokens`: every token's text, in id order.
pub(super) fn tokens(gguf: &GgufFile) -> Result<Vec<String>> {
    let tokens = entries(gguf, TOKENS, |v| Ok(v.to_string()?.clone()))?;
    if tokens.is_empty() {
        bail!("{TOKENS} is empty");
    }
    if u32::try_from(tokens.len()).is_err() {
        bail!(
            "{TOKENS} has {} entries, more than ids can name",
            tokens.len()
        );
    }
    Ok(tokens)
}

/// `tokenizer.ggml.token_type`, one per token; every token is normal when the key is absent
/// (as in llama.cpp).
pub(super) fn token_types(gguf: &GgufFile, n_tokens: usize) -> Result<Vec<TokenType>> {
    let Some(value) = gguf.content.metadata.get(TOKEN_TYPE) else {
        return Ok(vec![TokenType::Normal; n_tokens]);
    };
    let types = each(value, TOKEN_TYPE, |v| {
        let t = v.to_i32()?;
        TokenType::from_gguf(t).with_context(|| format!("{t} is not a type from 0 to 6"))
    })?;
    same_length(TOKEN_TYPE, types.len(), n_tokens)?;
    Ok(types)
}

/// `tokenizer.ggml.scores` (float32, or int32 as some converters write), one per token; all
/// zero when the key is absent (as in llama.cpp).
pub(super) fn scores(gguf: &GgufFile, n_tokens: usize) -> Result<Vec<f32>> {
    let Some(value) = gguf.content.metadata.get(SCORES) else {
        return Ok(vec![0.0; n_tokens]);
    };
    let scores = each(value, SCORES, |v| {
        Ok(v.to_f32().or_else(|_| v.to_i32().map(|s| s as f32))?)
    })?;
    same_length(SCORES, scores.len(), n_tokens)?;
    Ok(scores)
}

/// An id key that must name a token when present.
pub(super) fn opt_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    if !gguf.content.metadata.contains_key(key) {
        return Ok(None);
    }
    let id = gguf.get_u32(key)?;
    if id as usize >= n_tokens {
        bail!("{key} is {id}, but there are only {n_tokens} tokens");
    }
    Ok(Some(id))
}

/// An id key that must be present and name a token.
pub(super) fn id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<u32> {
    opt_id(gguf, key, n_tokens)?.with_context(|| format!("GGUF metadata key {key} is missing"))
}

/// Every entry of the array at `key`, read by `read`; an error names the key and the entry.
pub(super) fn entries<T>(
    gguf: &GgufFile,
    key: &str,
    read: impl Fn(&Value) -> Result<T>,
) -> Result<Vec<T>> {
    let value = gguf
        .content
        .metadata
        .get(key)
        .with_context(|| format!("GGUF metadata key {key} is missing"))?;
    each(value, key, read)
}

fn each<T>(value: &Value, key: &str, read: impl Fn(&Value) -> Result<T>) -> Result<Vec<T>> {
    value
        .to_vec()
        .map_err(|e| anyhow::anyhow!("GGUF metadata key {key}: {e}"))?
        .iter()
        .enumerate()
        .map(|(i, v)| read(v).with_context(|| format!("{key}: entry {i}")))
        .collect()
}

fn same_length(key: &str, len: usize, n_tokens: usize) -> Result<()> {
    if len != n_tokens {
        bail!("{key} has {len} entries for {n_tokens} tokens");
    }
    Ok(())
}
