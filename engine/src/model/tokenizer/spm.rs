//! SentencePiece tokenization (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral 7B, Phi-3),
//! computed as llama.cpp's `llm_tokenizer_spm` does so that prompts get the ids the model was
//! trained on: spaces become U+2581, adjacent pieces merge greedily by the score of the token
//! they make, and what no token spells falls back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use anyhow::{Context, Result, bail};

use super::metadata::{TOKEN_TYPE, TOKENS, TokenType};

/// SentencePiece's stand-in for a space inside tokens ("▁").
const SPACE_MARK: char = '\u{2581}';

struct Piece {
    text: String,
    score: f32,
    kind: TokenType,
}

pub struct Spm {
    pieces: Vec<Piece>,
    /// Every token by its text.
    ids: ahash::AHashMap<String, u32>,
    /// The token of each byte for byte fallback, where the vocabulary has one.
    byte_ids: [Option<u32>; 256],
    /// Whether a space is put before text at the start and after a special token
    /// (`tokenizer.ggml.add_space_prefix`).
    add_space_prefix: bool,
    /// BOS, when the model adds it: decoding skips it and keeps the space after it.
    leading_bos: Option<u32>,
}

impl Spm {
    /// Check the vocabulary and index it. Lengths are already equal (metadata.rs).
    pub(super) fn new(
        tokens: Vec<String>,
        types: &[TokenType],
        scores: &[f32],
        add_space_prefix: bool,
        leading_bos: Option<u32>,
    ) -> Result<Self> {
        let mut ids = ahash::AHashMap::with_capacity(tokens.len());
        let mut pieces = Vec::with_capacity(tokens.len());
        let entries = tokens.into_iter().zip(types.iter().zip(scores));
        // The count fits in u32: metadata::tokens checked it.
        for (id, (text, (&kind, &score))) in (0u32..).zip(entries) {
            if let Some(first) = ids.insert(text.clone(), id) {
                bail!("{TOKENS}: token {id} {text:?} repeats token {first}");
            }
            if kind == TokenType::Byte && byte_of(&text).is_none() {
                bail!("{TOKEN_TYPE}: token {id} {text:?} is a byte token (6) but not <0xXX>");
            }
            pieces.push(Piece {
                text,
                score: ordered_score(score),
                kind,
            });
        }
        let byte_ids = std::array::from_fn(|b| byte_token(&ids, &pieces, b as u8));
        Ok(Self {
            pieces,
            ids,
            byte_ids,
            add_space_prefix,
            leading_bos,
        })
    }

    pub(super) fn token_to_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The token that text may become: never a control, unknown or byte token. llama.cpp
    /// looks merges up among all tokens, so a vocabulary whose merges spell a control token
    /// would let typed text become one; here it cannot.
    fn text_token(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied().filter(|&id| {
            !matches!(
                self.pieces[id as usize].kind,
                TokenType::Control | TokenType::Unknown | TokenType::Byte
            )
        })
    }

    /// Ids of one run of raw text; `after_special` when it starts the prompt or follows a
    /// special token, where llama.cpp puts the space prefix (`is_prev_special`).
    pub(super) fn encode(&self, text: &str, after_special: bool) -> Result<Vec<u32>> {
        let mut escaped = String::with_capacity(text.len() + SPACE_MARK.len_utf8());
        if self.add_space_prefix && after_special {
            escaped.push(SPACE_MARK);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));
        let symbols = self.merge(&escaped);
        let mut ids = Vec::with_capacity(symbols.len());
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &escaped[s.start..s.start + s.len];
            match self.text_token(piece) {
                Some(id) => ids.push(id),
                None => {
                    for b in piece.bytes() {
                        ids.push(self.byte_ids[b as usize].with_context(|| {
                            format!(
                                "{TOKENS} has no byte token <0x{b:02X}> for text it cannot spell"
                            )
                        })?);
                    }
                }
            }
            at = s.next;
        }
        Ok(ids)
    }

    /// llama.cpp's greedy merge: start from single characters, and repeatedly join the
    /// adjacent pair whose joined text is the highest-scoring token (the leftmost pair on a
    /// tie), until no pair makes a token. Returns the linked list of symbols, head at 0.
    fn merge(&self, text: &str) -> Vec<Symbol> {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.push_bigram(text, &symbols, right - 1, right, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            // One side was merged into something else since this pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].prev = Some(bigram.left);
                self.push_bigram(text, &symbols, bigram.left, next, &mut queue);
            }
            if let Some(prev) = left.prev {
                self.push_bigram(text, &symbols, prev, bigram.left, &mut queue);
            }
        }
        symbols
    }

    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let start = symbols[left].start;
        let size = symbols[left].len + symbols[right].len;
        if let Some(id) = self.text_token(&text[start..start + size]) {
            queue.push(Bigram {
                score: self.pieces[id as usize].score,
                left,
                right,
                size,
            });
        }
    }

    /// Text of `ids` as llama.cpp's `detokenize` gives it with special tokens removed and
    /// not rendered: U+2581 is a space again, byte tokens are their byte, control, unknown
    /// and unused tokens are nothing. When `ids` start the text, the space prefix is taken
    /// off the first token, except after a leading BOS (which llama.cpp keeps, as it does
    /// here); ids that continue a text (generated ones) keep every space, as llama-server's
    /// output does.
    pub(super) fn decode(&self, ids: &[u32], starts_text: bool) -> String {
        let mut ids = ids;
        let mut strip_space = self.add_space_prefix && starts_text;
        if let (Some(bos), Some((&first, rest))) = (self.leading_bos, ids.split_first())
            && first == bos
        {
            strip_space = false;
            ids = rest;
        }
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.piece_bytes(id, false);
            let piece = match piece.strip_prefix(b" ") {
                Some(rest) if i == 0 && strip_space => rest,
                _ => &piece,
            };
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes one token stands for (llama.cpp's `token_to_piece`); control and unknown
    /// tokens give their text only when `render_special`.
    pub(super) fn piece_bytes(&self, id: u32, render_special: bool) -> Vec<u8> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return Vec::new();
        };
        match piece.kind {
            TokenType::Normal => piece.text.replace(SPACE_MARK, " ").into_bytes(),
            TokenType::Byte => byte_of(&piece.text).map(|b| vec![b]).unwrap_or_default(),
            TokenType::UserDefined => piece.text.clone().into_bytes(),
            TokenType::Control | TokenType::Unknown if render_special => {
                piece.text.clone().into_bytes()
            }
            _ => Vec::new(),
        }
    }
}

/// One piece of text being merged: `len` bytes from `start`; 0 once merged into its left
/// neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols, ordered as llama.cpp's queue pops them: higher
/// score first, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// A score as a total order sees it the way llama.cpp's float comparison does: -0 equals 0,
/// and NaN (which C++ orders arbitrarily) is the lowest.
fn ordered_score(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score + 0.0
    }
}

/// The byte a `<0xXX>` token stands for.
fn byte_of(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's `byte_to_token`: the token `<0xXX>`, else (ASCII only) the byte's own
/// one-character token; never a control or unknown token, which text must not become.
fn byte_token(all: &ahash::AHashMap<String, u32>, pieces: &[Piece], b: u8) -> Option<u32> {
    let hex = all.get(&format!("<0x{b:02X}>"));
    let plain = || {
        b.is_ascii()
            .then(|| all.get(&char::from(b).to_string()))
            .flatten()
    };
    hex.or_else(plain).copied().filter(|&id| {
        !matches!(
            pieces[id as usize].kind,
            TokenType::Control | TokenType::Unknown
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{Spm, TokenType};

    /// A vocabulary small enough to follow by hand: "▁a" beats "ab", so "▁ab" is "▁a" "b"
    /// even though "ab" is a token.
    fn vocab(add_space_prefix: bool) -> Spm {
        let mut tokens: Vec<(String, f32, TokenType)> = vec![
            ("<unk>".into(), 0.0, TokenType::Unknown),
            ("<s>".into(), 0.0, TokenType::Control),
            ("</s>".into(), 0.0, TokenType::Control),
            ("▁".into(), -1.0, TokenType::Normal),
            ("a".into(), -2.0, TokenType::Normal),
            ("b".into(), -2.0, TokenType::Normal),
            ("▁a".into(), -0.5, TokenType::Normal),
            ("ab".into(), -0.7, TokenType::Normal),
            ("<s".into(), -0.1, TokenType::Normal),
        ];
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, TokenType::Byte)));
        let types: Vec<_> = tokens.iter().map(|t| t.2).collect();
        let scores: Vec<_> = tokens.iter().map(|t| t.1).collect();
        let texts = tokens.into_iter().map(|t| t.0).collect();
        Spm::new(texts, &types, &scores, add_space_prefix, Some(1)).unwrap()
    }

    const BYTE_BASE: u32 = 9;

    #[test]
    fn merges_by_score_then_position_and_falls_back_to_bytes() {
        let v = vocab(true);
        assert_eq!(v.encode("ab", true).unwrap(), [6, 5]); // ▁a b
        assert_eq!(v.encode("ab", false).unwrap(), [7]); // ab
        assert_eq!(v.encode("aa a", false).unwrap(), [4, 4, 6]); // a a ▁a
        // "é" is no token: its two UTF-8 bytes.
        assert_eq!(
            v.encode("é", false).unwrap(),
            [BYTE_BASE + 0xC3, BYTE_BASE + 0xA9]
        );
        assert_eq!(v.encode("", false).unwrap(), Vec::<u32>::new());
    }

    /// `<s` is a token and `<s>` is the control token: merging must not make it, or a user
    /// typing `<s>` would write BOS.
    #[test]
    fn merges_never_make_a_control_token() {
        let v = vocab(false);
        let ids = v.encode("<s>", false).unwrap();
        assert_eq!(ids, [8, BYTE_BASE + u32::from(b'>')]);
    }

    #[test]
    fn decodes_spaces_and_bytes_and_skips_control_tokens() {
        let v = vocab(true);
        let ids = v.encode("ab é", true).unwrap();
        assert_eq!(v.decode(&ids, true), "ab é");
        assert_eq!(
            v.decode(&ids, false),
            " ab é",
            "a continuation keeps its space"
        );
        // After BOS, llama.cpp keeps the space prefix.
        let mut with_bos = vec![1];
        with_bos.extend(&ids);
        assert_eq!(v.decode(&with_bos, true), " ab é");
        // </s> renders as nothing, but it is the first token: the next keeps its space.
        assert_eq!(v.decode(&[2, 6], true), " a");
        assert_eq!(v.piece_bytes(BYTE_BASE + 0xC3, true), [0xC3]);
        assert_eq!(v.piece_bytes(2, true), b"</s>");
    }

    #[test]
    fn a_byte_token_that_is_not_hex_is_refused_by_name() {
        let err = Spm::new(
            vec!["<0xZZ>".into()],
            &[TokenType::Byte],
            &[0.0],
            true,
            None,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("tokenizer.ggml.token_type"),
            "{err}"
        );
        let dup = Spm::new(
            vec!["a".into(), "a".into()],
            &[TokenType::Normal; 2],
            &[0.0; 2],
            true,
            None,
        )
        .err()
        .unwrap();
        assert!(dup.to_string().contains("tokenizer.ggml.tokens"), "{dup}");
    }

    #[test]
    fn missing_byte_tokens_are_an_error_only_when_needed() {
        let v = Spm::new(
            vec!["▁".into(), "a".into()],
            &[TokenType::Normal; 2],
            &[0.0; 2],
            true,
            None,
        )
        .unwrap();
        assert_eq!(v.encode("a a", true).unwrap(), [0, 1, 0, 1]);
        let err = v.encode("é", true).err().unwrap();
        assert!(err.to_string().contains("<0xC3>"), "{err}");
    }
}
