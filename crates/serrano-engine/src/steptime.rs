//! The step-time model: how long one engine step takes on the hardware it runs on, as a
//! function of what the step holds, learned from the steps the engine runs. It is the project's
//! one step-time model: the scheduler sizes steps with it, `/metrics` shows it, and
//! `--step-log` writes the observations it learns from.
//!
//! ```text
//! seconds ≈ c0 + c1 · prefill_tokens + c2 · decode_seqs + c3 · kv_tokens / 1000
//! ```
//!
//! `kv_tokens` is the attention work: every token of the step times the positions it attends
//! to. The fit is least squares over the last [`WINDOW`] steps and the start-up calibration's
//! steps, kept as running sums of the normal equations (a step adds its row, the oldest step's
//! row is taken out; calibration rows stay), so a refit is a 4x4 solve. The calibration rows
//! stay because real traffic seldom tells attention from prompt tokens (they grow together in
//! every prompt chunk): fitted on short prompts alone, the attention term came out 2-3x high
//! and long prompts were priced at twice their time (BENCHMARKS.md, the simulator's
//! validation); the calibration's long-context chunks pin it. A small ridge term keeps a window of identical steps solvable (a server that only
//! ever decodes learns nothing about prefill, and says so: its prefill cost is 0 until it has
//! seen one).
//!
//! Hand-written: the fit is forty lines of arithmetic, and no crate does online least squares
//! over a window without pulling in a linear-algebra stack.

use std::collections::VecDeque;

/// Steps the model fits over.
pub const WINDOW: usize = 512;
/// Steps before the model predicts anything.
pub const MIN_STEPS: usize = 16;
/// Steps with prompt tokens, and steps without, the window must hold for its prompt-token cost
/// to be trusted for budgets (with only one kind, that cost cannot be told from the
/// intercept); otherwise the last trusted fit is used.
pub const MIN_PREFILL_STEPS: usize = 8;
const TERMS: usize = 4;
/// Ridge term, relative to the features' scale (seconds of a typical step are ~1e-3..1e-1).
const RIDGE: f64 = 1e-6;

/// What a step holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Tokens of prompt chunks (and recomputed tokens of preempted sequences).
    pub prefill_tokens: usize,
    /// Sequences decoding one token.
    pub decode_seqs: usize,
    /// Positions attended to, summed over the step's tokens.
    pub kv_tokens: usize,
}

impl StepShape {
    fn features(&self) -> [f64; TERMS] {
        [
            1.0,
            self.prefill_tokens as f64,
            self.decode_seqs as f64,
            self.kv_tokens as f64 / 1000.0,
        ]
    }
}

/// Positions a chunk of `len` tokens starting at `start` attends to (causal: token `start + i`
/// sees `start + i + 1` positions).
pub fn chunk_kv_tokens(start: usize, len: usize) -> usize {
    len * start + len * (len + 1) / 2
}

/// The model, learned online.
#[derive(Debug, Clone)]
pub struct StepModel {
    window: VecDeque<([f64; TERMS], f64)>,
    xtx: [[f64; TERMS]; TERMS],
    xty: [f64; TERMS],
    coef: Option<[f64; TERMS]>,
    /// Steps in the window with prompt tokens.
    prefill_steps: usize,
    /// The last fit made from a window with [`MIN_PREFILL_STEPS`] steps of either kind.
    trusted: Option<[f64; TERMS]>,
    /// Relative error of the last prediction made before its step was observed.
    pub last_error: Option<f64>,
    /// Calibration rows in the sums, outside the window, and those with prompt tokens.
    pinned: usize,
    pinned_prefill: usize,
}

impl Default for StepModel {
    fn default() -> Self {
        StepModel {
            window: VecDeque::with_capacity(WINDOW),
            xtx: [[0.0; TERMS]; TERMS],
            xty: [0.0; TERMS],
            coef: None,
            prefill_steps: 0,
            trusted: None,
            last_error: None,
            pinned: 0,
            pinned_prefill: 0,
        }
    }
}

impl StepModel {
    /// Learns from a calibration step that took `seconds`: its row stays in the fit for good
    /// (real steps come and go with the window).
    pub fn observe_pinned(&mut self, shape: StepShape, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let x = shape.features();
        self.add(&x, seconds, 1.0);
        self.pinned += 1;
        self.pinned_prefill += usize::from(x[1] > 0.0);
        self.refit();
    }

    /// Learns from one step that took `seconds`.
    pub fn observe(&mut self, shape: StepShape, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if let Some(p) = self.predict(shape) {
            self.last_error = Some((p - seconds) / seconds.max(1e-9));
        }
        let x = shape.features();
        self.add(&x, seconds, 1.0);
        self.prefill_steps += usize::from(x[1] > 0.0);
        self.window.push_back((x, seconds));
        if self.window.len() > WINDOW {
            if let Some((old, y)) = self.window.pop_front() {
                self.add(&old, y, -1.0);
                self.prefill_steps -= usize::from(old[1] > 0.0);
            }
        }
        self.refit();
    }

    fn refit(&mut self) {
        if self.window.len() + self.pinned >= MIN_STEPS {
            self.coef = self.solve();
            let prefill = self.prefill_steps + self.pinned_prefill;
            let plain = self.window.len() + self.pinned - prefill;
            if prefill.min(plain) >= MIN_PREFILL_STEPS {
                self.trusted = self.coef;
            }
        }
    }

    fn add(&mut self, x: &[f64; TERMS], y: f64, sign: f64) {
        for i in 0..TERMS {
            for j in 0..TERMS {
                self.xtx[i][j] += sign * x[i] * x[j];
            }
            self.xty[i] += sign * x[i] * y;
        }
    }

    /// The normal equations with a ridge, by Gaussian elimination with partial pivoting.
    fn solve(&self) -> Option<[f64; TERMS]> {
        let mut a = self.xtx;
        let mut b = self.xty;
        let n = (self.window.len() + self.pinned) as f64;
        for (i, row) in a.iter_mut().enumerate().skip(1) {
            // The intercept is not shrunk; the other terms are, in proportion to the data.
            row[i] += RIDGE * n;
        }
        for col in 0..TERMS {
            let pivot =
                (col..TERMS).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
            if a[pivot][col].abs() < 1e-18 {
                return None;
            }
            a.swap(col, pivot);
            b.swap(col, pivot);
            let (pivot_row, pivot_b) = (a[col], b[col]);
            let others = a.iter_mut().zip(b.iter_mut()).enumerate();
            for (_, (row, rb)) in others.filter(|(r, _)| *r != col) {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                    *v -= f * p;
                }
                *rb -= f * pivot_b;
            }
        }
        let mut x = [0.0; TERMS];
        for i in 0..TERMS {
            x[i] = b[i] / a[i][i];
        }
        x.iter().all(|v| v.is_finite()).then_some(x)
    }

    /// A model with these coefficients, as if fitted from enough steps of both kinds: a real
    /// engine's fit (`coefficients`, which `/metrics` reports) replayed by the simulator, so
    /// there is one step-time model in the project, not a second fit.
    pub fn from_coefficients(c: [f64; TERMS]) -> StepModel {
        StepModel {
            coef: Some(c),
            trusted: Some(c),
            ..StepModel::default()
        }
    }

    /// The fitted coefficients (intercept s, s per prefill token, s per decoding sequence, s per
    /// thousand positions attended), once enough steps were seen.
    pub fn coefficients(&self) -> Option<[f64; TERMS]> {
        self.coef
    }

    /// Predicted seconds for a step of `shape`.
    pub fn predict(&self, shape: StepShape) -> Option<f64> {
        let c = self.coef?;
        let x = shape.features();
        Some((0..TERMS).map(|i| c[i] * x[i]).sum::<f64>().max(0.0))
    }

    /// Most prefill tokens that can join `decode` (a step of decodes only) within `target`
    /// seconds, the prefill starting at position `start`; `None` before the model predicts
    /// anything (the first steps are not limited). Priced by the last fit whose window held
    /// enough prompt steps; without one (only decodes seen) it says 0, and the caller's floor
    /// shows it what prompt tokens cost.
    pub fn prefill_budget(&self, decode: StepShape, start: usize, target: f64) -> Option<usize> {
        self.coef?;
        let Some(c) = self.trusted.filter(|c| c[1] > 0.0) else {
            return Some(0);
        };
        let fits = |n: usize| {
            let shape = StepShape {
                prefill_tokens: n,
                kv_tokens: decode.kv_tokens + chunk_kv_tokens(start, n),
                ..decode
            };
            let x = shape.features();
            (0..TERMS).map(|i| c[i] * x[i]).sum::<f64>() <= target
        };
        if let Some(n) = budget_near_root(c, decode, start, target, &fits) {
            return Some(n);
        }
        Some(bisect_budget(&fits))
    }
}

/// Most prefill tokens [`StepModel::prefill_budget`] allows, found next to the root of the
/// prediction (a quadratic in the prompt tokens: they attend to each other) and checked there:
/// the same answer as [`bisect_budget`] when the prediction grows with the prompt tokens, in a
/// handful of predictions instead of ~40 (the simulator asks twice a step). `None` where the
/// prediction may not grow (a negative per-position cost) or the root is not near: the caller
/// bisects.
fn budget_near_root(
    c: [f64; TERMS],
    decode: StepShape,
    start: usize,
    target: f64,
    fits: &impl Fn(usize) -> bool,
) -> Option<usize> {
    const MAX: usize = 1 << 20;
    const NEAR: usize = 4;
    if c[1] <= 0.0 || c[3] < 0.0 {
        return None;
    }
    if fits(MAX) {
        return Some(MAX);
    }
    // a n^2 + b n + k <= 0, from c0 + c1 n + c2 d + c3 (kv + n start + n (n + 1) / 2) / 1000.
    let a = c[3] / 2000.0;
    let b = c[1] + c[3] * (start as f64 + 0.5) / 1000.0;
    let k =
        c[0] + c[2] * decode.decode_seqs as f64 + c[3] * decode.kv_tokens as f64 / 1000.0 - target;
    let root = if a > 0.0 {
        (-b + (b * b - 4.0 * a * k).sqrt()) / (2.0 * a)
    } else {
        -k / b
    };
    if !root.is_finite() {
        return None;
    }
    let mut n = (root.max(0.0) as usize).min(MAX - 1);
    for _ in 0..NEAR {
        if n == 0 || fits(n) {
            break;
        }
        n -= 1;
    }
    if n > 0 && !fits(n) {
        return None;
    }
    for _ in 0..NEAR {
        if n + 1 >= MAX || !fits(n + 1) {
            return Some(n);
        }
        n += 1;
    }
    None
}

/// The largest `n` below 2^20 that `fits` (or 2^20 if that fits; 0 if nothing does), by
/// doubling then bisection: right where `fits` is monotone.
fn bisect_budget(fits: &impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, 1usize);
    while fits(hi) {
        if hi >= 1 << 20 {
            return hi;
        }
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn truth(s: StepShape) -> f64 {
        0.004
            + 0.0008 * s.prefill_tokens as f64
            + 0.0015 * s.decode_seqs as f64
            + 0.00000002 * s.kv_tokens as f64
    }

    fn shapes() -> impl Strategy<Value = StepShape> {
        (0usize..256, 0usize..33, 0usize..2048).prop_map(|(p, d, ctx)| StepShape {
            prefill_tokens: p,
            decode_seqs: d,
            kv_tokens: d * ctx + chunk_kv_tokens(ctx, p),
        })
    }

    proptest! {
        #[test]
        fn learns_a_linear_cost_from_mixed_steps(steps in prop::collection::vec(shapes(), 64..200)) {
            let mut m = StepModel::default();
            for s in &steps {
                m.observe(*s, truth(*s));
            }
            // Only varied enough windows identify every term; the rest still predict the steps
            // seen.
            for s in steps.iter().rev().take(8) {
                let p = m.predict(*s).unwrap();
                prop_assert!((p - truth(*s)).abs() <= 0.05 * truth(*s) + 1e-4, "{p} vs {}", truth(*s));
            }
        }
    }

    #[test]
    fn the_budget_is_the_largest_prefill_within_the_target() {
        let mut m = StepModel::default();
        let mut k = 0;
        for p in [0, 0, 16, 64, 128, 256] {
            for d in [1, 8, 32] {
                for ctx in [100, 1000] {
                    let s = StepShape {
                        prefill_tokens: p,
                        decode_seqs: d,
                        kv_tokens: d * ctx + chunk_kv_tokens(k % 500, p),
                    };
                    k += 37;
                    m.observe(s, truth(s));
                }
            }
        }
        let decode = StepShape {
            prefill_tokens: 0,
            decode_seqs: 32,
            kv_tokens: 32 * 300,
        };
        let n = m.prefill_budget(decode, 0, 0.1).unwrap();
        let at = |n| StepShape {
            prefill_tokens: n,
            kv_tokens: decode.kv_tokens + chunk_kv_tokens(0, n),
            ..decode
        };
        assert!(truth(at(n)) <= 0.1 + 1e-3, "{n}");
        assert!(truth(at(n + 2)) > 0.1 - 1e-3, "{n}");
        // A target the decodes alone miss leaves no room.
        assert_eq!(m.prefill_budget(decode, 0, 0.01), Some(0));
        // Nothing learned yet: no budget.
        assert_eq!(StepModel::default().prefill_budget(decode, 0, 0.1), None);
        // Only decodes seen: no prompt token is known to fit.
        let mut m = StepModel::default();
        for d in 1..40 {
            let s = StepShape {
                prefill_tokens: 0,
                decode_seqs: d,
                kv_tokens: d * 100,
            };
            m.observe(s, truth(s));
        }
        assert_eq!(m.prefill_budget(decode, 0, 1.0), Some(0));
    }

    proptest! {
        /// The budget found next to the prediction's root is the bisection's, whatever the
        /// coefficients (negative ones included: those bisect), decodes, start and target.
        #[test]
        fn the_budget_near_the_root_is_the_bisections(
            c0 in -0.01f64..0.1,
            c1 in prop_oneof![1e-9f64..1e-2, -1e-4f64..0.0],
            c2 in -1e-3f64..1e-2,
            c3 in prop_oneof![0.0f64..1e-2, Just(0.0), -1e-5f64..0.0],
            seqs in 0usize..256,
            kv in 0usize..200_000,
            start in 0usize..8192,
            target in 0.0f64..2.0,
        ) {
            let c = [c0, c1, c2, c3];
            let m = StepModel::from_coefficients(c);
            let decode = StepShape { prefill_tokens: 0, decode_seqs: seqs, kv_tokens: kv };
            let fits = |n: usize| {
                let x = StepShape {
                    prefill_tokens: n,
                    kv_tokens: kv + chunk_kv_tokens(start, n),
                    ..decode
                }
                .features();
                (0..TERMS).map(|i| c[i] * x[i]).sum::<f64>() <= target
            };
            let want = if c1 > 0.0 { bisect_budget(&fits) } else { 0 };
            prop_assert_eq!(m.prefill_budget(decode, start, target), Some(want));
        }
    }

    #[test]
    fn the_window_forgets_old_steps() {
        let mut m = StepModel::default();
        let s = |p| StepShape {
            prefill_tokens: p,
            decode_seqs: 4,
            kv_tokens: 400,
        };
        for i in 0..WINDOW {
            m.observe(s(i % 64), 0.01 + 0.001 * (i % 64) as f64);
        }
        // The hardware got twice as slow: after a window, the model says so.
        for i in 0..WINDOW {
            m.observe(s(i % 64), 2.0 * (0.01 + 0.001 * (i % 64) as f64));
        }
        let p = m.predict(s(32)).unwrap();
        assert!((p - 2.0 * 0.042).abs() < 1e-3, "{p}");
    }

    /// Calibration rows outlive the window: after two windows of decode-only traffic (which
    /// cannot tell what prompt tokens or attention cost), the model still prices a long prompt
    /// chunk as the calibration measured it.
    #[test]
    fn pinned_rows_stay_after_the_window_turns_over() {
        let mut m = StepModel::default();
        for k in 0..8 {
            let chunk = StepShape {
                prefill_tokens: 128,
                decode_seqs: 0,
                kv_tokens: chunk_kv_tokens(128 * k, 128),
            };
            let decode = StepShape {
                prefill_tokens: 0,
                decode_seqs: 1 + k,
                kv_tokens: (1 + k) * 100,
            };
            for s in [chunk, decode] {
                m.observe_pinned(s, truth(s));
            }
        }
        for i in 0..2 * WINDOW {
            let s = StepShape {
                prefill_tokens: 0,
                decode_seqs: 1 + i % 8,
                kv_tokens: (1 + i % 8) * 300,
            };
            m.observe(s, truth(s));
        }
        let deep = StepShape {
            prefill_tokens: 128,
            decode_seqs: 0,
            kv_tokens: chunk_kv_tokens(2048, 128),
        };
        let p = m.predict(deep).unwrap();
        assert!(
            (p / truth(deep) - 1.0).abs() < 1e-3,
            "{p} vs {}",
            truth(deep)
        );
        assert!(m
            .prefill_budget(StepShape::default(), 0, 0.05)
            .is_some_and(|b| b > 0));
    }
}
