//! Streaming: token ids to text deltas, holding back a character cut between tokens.

use super::ModelTokenizer;

/// Turns a growing list of token ids into text deltas without ever splitting a UTF-8
/// character: a delta is released only once it no longer ends in a partial character.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window re-decoded each step (a few tokens back, for merges across tokens).
    prefix_offset: usize,
    /// Ids before this index have been released as text.
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one id; returns the newly complete text, if any.
    pub fn push(&mut self, tok: &ModelTokenizer, id: u32) -> String {
        self.ids.push(id);
        let (prefix, full) = self.window(tok);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            self.release();
            full[prefix.len()..].to_owned()
        } else {
            String::new()
        }
    }

    /// The text of the ids already released in the window, and of the whole window.
    fn window(&self, tok: &ModelTokenizer) -> (String, String) {
        let prefix = tok
            .decode_continuation(&self.ids[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let full = tok
            .decode_continuation(&self.ids[self.prefix_offset..])
            .unwrap_or_default();
        (prefix, full)
    }

    /// Mark every id as released; the window restarts at the previous release point.
    fn release(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
    }

    /// At the end of a generation: whatever is still held back (a character cut by the last
    /// token), with the incomplete bytes shown as U+FFFD, as a client decoding the bytes would.
    pub fn flush(&mut self, tok: &ModelTokenizer) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let (prefix, full) = self.window(tok);
        self.release();
        match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => full,
        }
    }
}
