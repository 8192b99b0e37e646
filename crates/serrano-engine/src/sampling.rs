//! Token selection: penalties, temperature, top-k, top-p, min-p, seeded sampling, log-probs.
//!
//! Order as in vLLM: logit bias and penalties on the raw logits, then temperature, then the
//! top-k / top-p / min-p filters, then a draw. Temperature 0 is greedy. Log-probs reported to
//! clients are those of the raw model distribution.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Below this temperature sampling is greedy (avoids dividing by ~0).
const GREEDY_EPS: f32 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// llama.cpp/HF style: divides positive logits of seen tokens, multiplies negative ones.
    pub repetition_penalty: f32,
    /// OpenAI style: subtracts `frequency * count + presence * (count > 0)` from seen tokens.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }
}

/// One sequence's sampler: its parameters, its random stream, the counts for penalties.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token so far (prompt and output for the repetition penalty,
    /// output only for frequency/presence, as OpenAI and vLLM define them).
    output_counts: HashMap<u32, u32>,
    /// Prompt tokens (kept only when the repetition penalty is on).
    prompt_tokens: std::collections::HashSet<u32>,
    /// Reused per step so sampling allocates nothing after the first token.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt_tokens: if params.repetition_penalty != 1.0 {
                prompt.iter().copied().collect()
            } else {
                Default::default()
            },
            params,
            output_counts: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (modified in place by bias and penalties).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let p = &self.params;
        let id = if p.temperature < GREEDY_EPS {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.output_counts.entry(id).or_insert(0) += 1;
        id
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            // Each seen token once, whether it was in the prompt, the output or both.
            let seen = self.prompt_tokens.iter().chain(
                self.output_counts
                    .keys()
                    .filter(|t| !self.prompt_tokens.contains(t)),
            );
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if c.is_empty() {
            return 0;
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        // Softmax over the survivors (sorted, so c[0] holds the max).
        let max = c[0].1;
        let mut sum = 0f32;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        for e in c.iter_mut() {
            e.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            c.retain(|e| e.1 >= floor);
        }
        let total: f32 = c.iter().map(|e| e.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for e in c.iter() {
            if r < e.1 {
                return e.0;
            }
            r -= e.1;
        }
        c[c.len() - 1].0
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

/// Log-probabilities of a distribution: the chosen token's and the `top_n` best.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// log-softmax of `logits` evaluated at `token` and at the `top_n` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        // A bounded insertion pass: top_n is small (<= 20), the vocabulary large.
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < top_n || l > top[top.len() - 1].1 {
                let at = top.partition_point(|e| e.1 >= l);
                top.insert(at, (i as u32, l));
                top.truncate(top_n);
            }
        }
    }
    for e in &mut top {
        e.1 -= lse;
    }
    let logprob = logits
        .get(token as usize)
        .map(|l| l - lse)
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs {
        token,
        logprob,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9, -1.0]
    }

    fn histogram(params: SamplingParams, n: usize) -> [usize; 6] {
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(42),
                ..params
            },
            &[],
        );
        let mut h = [0usize; 6];
        for _ in 0..n {
            // Fresh counts each draw so penalties do not interfere with the distribution.
            s.output_counts.clear();
            h[s.sample(&mut logits()) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        assert_eq!(s.sample(&mut logits()), 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let run = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..Default::default()
                },
                &[],
            );
            (0..64).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_restricts_to_k_best() {
        let h = histogram(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            2000,
        );
        assert_eq!(h[0] + h[2] + h[3] + h[5], 0);
        assert!(h[1] > 0 && h[4] > 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [.06 .37 .14 .03 .34 .01]; p = 0.5 keeps tokens 1 and 4.
        let h = histogram(
            SamplingParams {
                top_p: 0.5,
                ..Default::default()
            },
            2000,
        );
        assert_eq!(h[0] + h[2] + h[3] + h[5], 0);
        assert!(h[1] > 0 && h[4] > 0);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // min_p 0.3 of the best (.37) is .11: tokens 1, 4 and 2 survive.
        let h = histogram(
            SamplingParams {
                min_p: 0.3,
                ..Default::default()
            },
            3000,
        );
        assert_eq!(h[0] + h[3] + h[5], 0);
        assert!(h[1] > 0 && h[2] > 0 && h[4] > 0);
    }

    #[test]
    fn low_temperature_concentrates_high_spreads() {
        let cold = histogram(
            SamplingParams {
                temperature: 0.1,
                ..Default::default()
            },
            1000,
        );
        let hot = histogram(
            SamplingParams {
                temperature: 5.0,
                ..Default::default()
            },
            1000,
        );
        // 3.0 vs 2.9 at T=0.1 is 30 vs 29: only the two leaders survive in practice.
        assert!(cold[1] + cold[4] > 990 && cold[1] > cold[4]);
        assert!(hot[5] > 20);
    }

    #[test]
    fn penalties_discourage_repeats() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 2.0,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(s.sample(&mut logits()), 1);
        // Token 1 now pays 2.0: 3.0 - 2.0 = 1.0 < 2.9.
        assert_eq!(s.sample(&mut logits()), 4);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                frequency_penalty: 0.05,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(s.sample(&mut logits()), 1);
        assert_eq!(s.sample(&mut logits()), 1, "3.0 - 0.05 still beats 2.9");
        assert_eq!(
            s.sample(&mut logits()),
            1,
            "3.0 - 0.10 = 2.9 ties, first index wins"
        );
        assert_eq!(s.sample(&mut logits()), 4);
    }

    #[test]
    fn repetition_penalty_counts_the_prompt() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[1],
        );
        assert_eq!(s.sample(&mut logits()), 4, "3.0 / 2 = 1.5 < 2.9");
    }

    #[test]
    fn repetition_penalty_applies_once_to_a_token_in_prompt_and_output() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[1],
        );
        s.output_counts.insert(1, 3);
        let mut l = logits();
        s.apply_penalties(&mut l);
        assert_eq!(l[1], 1.5);
    }

    #[test]
    fn logit_bias_applies() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                logit_bias: vec![(5, 10.0)],
                ..Default::default()
            },
            &[],
        );
        assert_eq!(s.sample(&mut logits()), 5);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let lp = logprobs(&logits(), 2, 3);
        assert_eq!(
            lp.top.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 4, 2]
        );
        let total: f32 = logits()
            .iter()
            .map(|&l| (l - logits().iter().copied().fold(f32::MIN, f32::max)).exp())
            .sum();
        assert!((lp.top[0].1 - (-(total.ln()))).abs() < 1e-5);
        assert_eq!(lp.logprob, lp.top[2].1);
    }
}
