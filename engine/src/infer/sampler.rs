//! Token sampling: greedy, temperature, top-k, top-p, with a per-request seeded RNG so that
//! the same seed and input give the same output.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// Candidates ordered first when only top_p cuts: enough for the nucleus of almost every
/// distribution; a flatter one falls back to ordering the whole vocabulary.
const NUCLEUS_PREFIX: usize = 512;

/// Sampling settings of one request, already validated by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha12Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha12Rng::seed_from_u64(seed),
            None => ChaCha12Rng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// The tokens that may be drawn, best first when an order matters (top-k, top-p). Only as
    /// many are ordered as the cut needs, never the whole vocabulary for top-k; ties keep the
    /// lower id first, so the order is the same whatever the selection algorithm.
    fn candidates(&self, logits: &[f32]) -> Vec<u32> {
        let n = logits.len();
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut idx: Vec<u32> = (0..n as u32).collect();
        let top_k = self.params.top_k;
        let nucleus = self.params.top_p < 1.0;
        if top_k == 0 && !nucleus {
            return idx; // every token, in id order: the draw needs no ordering
        }
        // Top-k: the k best. Top-p alone: a prefix of the best, extended to the whole
        // vocabulary only if the prefix does not reach top_p.
        let k = if top_k > 0 {
            top_k.min(n)
        } else {
            NUCLEUS_PREFIX.min(n)
        };
        if k < n {
            idx.select_nth_unstable_by(k - 1, better);
        }
        let (best, _) = idx.split_at_mut(k);
        best.sort_unstable_by(better);
        if top_k == 0 && k < n && !self.prefix_reaches_top_p(logits, best) {
            idx.sort_unstable_by(better);
            return idx;
        }
        idx.truncate(k);
        idx
    }

    /// Whether the probability mass of `best` (under the temperature) reaches top_p.
    fn prefix_reaches_top_p(&self, logits: &[f32], best: &[u32]) -> bool {
        let t = self.params.temperature;
        let max = logits[best[0] as usize];
        let w = |l: f32| (((l - max) / t) as f64).exp();
        let total: f64 = logits.iter().map(|&l| w(l)).sum();
        let prefix: f64 = best.iter().map(|&i| w(logits[i as usize])).sum();
        prefix / total >= self.params.top_p as f64
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut idx = self.candidates(logits);
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    /// The candidates are what a full stable sort by logit would give, cut the same way, for
    /// top-k, for top-p reached inside the prefix, and for a flat distribution where top-p
    /// needs the whole vocabulary.
    #[test]
    fn candidates_equal_a_full_sort_without_sorting_everything() {
        let full = |l: &[f32]| {
            let mut idx: Vec<u32> = (0..l.len() as u32).collect();
            idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
            idx
        };
        let peaked: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 5000) as f32 / 100.0 + if i % 977 == 0 { 30.0 } else { 0.0 })
            .collect();
        let flat: Vec<f32> = (0..5000).map(|i| (i % 3) as f32 * 1e-3).collect();
        for l in [&peaked, &flat] {
            let s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k: 40,
                ..Default::default()
            });
            assert_eq!(s.candidates(l), full(l)[..40].to_vec());
            let s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                ..Default::default()
            });
            let c = s.candidates(l);
            assert_eq!(c, full(l)[..c.len()].to_vec());
            assert!(
                s.prefix_reaches_top_p(l, &c),
                "the candidates hold top_p of the mass"
            );
        }
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        });
        assert_eq!(
            s.candidates(&flat).len(),
            flat.len(),
            "a flat distribution needs all"
        );
    }

    #[test]
    fn greedy_takes_the_maximum() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..50).map(|_| s.sample(&logits())).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits())).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1 over 100 tokens should vary"
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        let l = logits();
        for _ in 0..20 {
            assert_eq!(s.sample(&l), argmax(&l));
        }
    }

    #[test]
    fn top_p_restricts_to_the_nucleus() {
        let mut l = vec![0.0f32; 10];
        l[3] = 10.0; // ~99.9% of the mass
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(3),
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&l), 3);
        }
    }
}
