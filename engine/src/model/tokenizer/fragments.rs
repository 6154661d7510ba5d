//! Cutting special tokens out of trusted text before tokenizing the rest, as llama.cpp's
//! `tokenizer_st_partition` does: one special token at a time, longest first, every
//! occurrence in every piece of text still open to the search. Text a message's author wrote
//! is never open to it, which is what keeps a typed `<|im_start|>` from becoming a control
//! token.

/// A special token as the partition looks for it.
pub(super) struct SpecialToken {
    pub text: String,
    pub id: u32,
    /// Whitespace after the token is dropped (llama.cpp's `RSTRIP` attribute, which it gives
    /// the special tokens of Phi-3).
    pub rstrip: bool,
}

/// A piece of a prompt on its way to token ids.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fragment<'a> {
    /// Text to tokenize; `open` when special tokens may still be cut out of it.
    Text {
        text: &'a str,
        open: bool,
    },
    Special(u32),
}

/// Order special tokens as llama.cpp searches for them: longest text first (ties by id, where
/// llama.cpp's unstable sort leaves them in no particular order).
pub(super) fn search_order(specials: &mut [SpecialToken]) {
    specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
}

/// Cut every special token (in [`search_order`]) out of the open text of `fragments`.
pub(super) fn partition<'a>(
    mut fragments: Vec<Fragment<'a>>,
    specials: &[SpecialToken],
) -> Vec<Fragment<'a>> {
    for special in specials.iter().filter(|s| !s.text.is_empty()) {
        let found = fragments.iter().any(|f| match f {
            Fragment::Text { text, open: true } => text.contains(&special.text),
            _ => false,
        });
        if !found {
            continue;
        }
        let mut out = Vec::with_capacity(fragments.len() + 2);
        for fragment in fragments {
            match fragment {
                Fragment::Text { text, open: true } => cut(text, special, &mut out),
                other => out.push(other),
            }
        }
        fragments = out;
    }
    fragments
}

/// Split `text` at every occurrence of `special`, left to right.
fn cut<'a>(text: &'a str, special: &SpecialToken, out: &mut Vec<Fragment<'a>>) {
    let mut rest = text;
    while let Some(at) = rest.find(&special.text) {
        if at > 0 {
            out.push(Fragment::Text {
                text: &rest[..at],
                open: true,
            });
        }
        out.push(Fragment::Special(special.id));
        rest = &rest[at + special.text.len()..];
        if special.rstrip {
            rest = rest.trim_start_matches(is_c_space);
        }
    }
    if !rest.is_empty() {
        out.push(Fragment::Text {
            text: rest,
            open: true,
        });
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp strips with.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

#[cfg(test)]
mod tests {
    use super::{Fragment, SpecialToken, partition, search_order};

    fn special(text: &str, id: u32) -> SpecialToken {
        SpecialToken {
            text: text.into(),
            id,
            rstrip: false,
        }
    }

    fn open(text: &str) -> Fragment<'_> {
        Fragment::Text { text, open: true }
    }

    /// The longer token wins where two overlap, whatever their order in the vocabulary, and
    /// text that is not open is left alone.
    #[test]
    fn longest_special_first_and_closed_text_untouched() {
        let mut specials = vec![special("<a>", 1), special("<a><b>", 2)];
        search_order(&mut specials);
        let closed = Fragment::Text {
            text: "<a>",
            open: false,
        };
        let got = partition(vec![open("x<a><b>y<a>"), closed], &specials);
        assert_eq!(
            got,
            vec![
                open("x"),
                Fragment::Special(2),
                open("y"),
                Fragment::Special(1),
                Fragment::Text {
                    text: "<a>",
                    open: false
                },
            ]
        );
    }

    #[test]
    fn rstrip_drops_the_whitespace_after_the_token_only() {
        let specials = [SpecialToken {
            rstrip: true,
            ..special("<|user|>", 7)
        }];
        let got = partition(vec![open(" <|user|>\n \tHi ")], &specials);
        assert_eq!(got, vec![open(" "), Fragment::Special(7), open("Hi ")]);
    }
}
