//! Prompt prefix reuse: the KV caches of recent prompts, so that a new prompt starting with
//! the same tokens (the chat template's system prompt, a conversation's earlier turns)
//! prefills only what follows.
//!
//! Scoped: a prompt reuses only prefixes cached for the same scope (the API key's name).
//! Reuse makes the first token come sooner, so across tenants its timing would tell one
//! whether another had recently sent a given prefix; within one key there is nobody to tell.
//!
//! Bounded: entries are whole prompts, evicted least recently used first when their caches
//! together would exceed the byte budget (`engine.prefix_cache_mb`).

use std::collections::VecDeque;

use crate::infer::models::llama::{LlamaModel, SeqCache};

/// Shorter common prefixes are prefilled anyway: copying the cache would save little.
const MIN_REUSE: usize = 8;

struct Entry {
    scope: String,
    tokens: Vec<u32>,
    cache: SeqCache,
}

pub struct PrefixCache {
    /// Least recently used first.
    entries: VecDeque<Entry>,
    budget_bytes: usize,
    held_bytes: usize,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            budget_bytes,
            held_bytes: 0,
        }
    }

    /// Whether prefixes are kept at all: a budget, and a model whose caches are the sequence's
    /// whole state (a pipeline head's are not: its stages hold the rest).
    fn applies(&self, model: &LlamaModel) -> bool {
        self.budget_bytes > 0 && model.is_whole()
    }

    /// A cache holding the longest prefix of `prompt` cached in `scope` (always leaving at
    /// least the prompt's last token to compute, whose logits are the first prediction), and
    /// that prefix's length. `None` when nothing of `MIN_REUSE` tokens or more matches.
    pub fn take(
        &mut self,
        model: &LlamaModel,
        scope: &str,
        prompt: &[u32],
    ) -> Option<(SeqCache, usize)> {
        if !self.applies(model) {
            return None;
        }
        let limit = prompt.len().saturating_sub(1);
        let (at, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, len)| len)?;
        if len < MIN_REUSE {
            return None;
        }
        let entry = self.entries.remove(at)?;
        let cache = model.copy_cache_prefix(&entry.cache, len);
        self.entries.push_back(entry);
        cache.map(|c| (c, len))
    }

    /// Keeps a copy of `cache`'s first `prompt.len()` positions (`cache` holds at least
    /// that many) as the prefix `prompt` in `scope`, replacing an entry for the same
    /// prompt, and evicts the least recently used entries beyond the budget.
    pub fn put(&mut self, model: &LlamaModel, scope: &str, prompt: &[u32], cache: &SeqCache) {
        if !self.applies(model) {
            return;
        }
        let bytes = model.cache_bytes(prompt.len());
        if prompt.len() < MIN_REUSE || bytes > self.budget_bytes {
            return;
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.scope == scope && e.tokens == prompt)
        {
            let old = self.entries.remove(i).expect("index from position");
            self.held_bytes -= model.cache_bytes(old.tokens.len());
        }
        let Some(copy) = model.copy_cache_prefix(cache, prompt.len()) else {
            return;
        };
        while self.held_bytes + bytes > self.budget_bytes {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.held_bytes -= model.cache_bytes(old.tokens.len());
        }
        self.held_bytes += bytes;
        self.entries.push_back(Entry {
            scope: scope.to_owned(),
            tokens: prompt.to_vec(),
            cache: copy,
        });
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }
}
