//! A short calibration at start-up: forward passes of chosen shapes (prompt chunks alone,
//! decodes of growing batches, both together), timed, so the step-time model can size steps from
//! the first request rather than after a few dozen real ones. Real steps refine it; the
//! calibration's steps stay in the fit (`StepModel::observe_pinned`), and its last steps are
//! prompt chunks deep into the context, so the attention term is measured where real traffic
//! of short prompts cannot tell it from the prompt-token cost.
//!
//! The passes run on blocks of the real KV pool, taken before any request and given back after,
//! and on throwaway tokens; nothing is registered in the prefix cache.

use std::time::{Duration, Instant};

use crate::model::{LogitsWanted, Model, SeqStep};
use crate::paged::{BlockTable, KvStorage, SharedAllocator};
use crate::scheduler::Planned;

/// Wall time calibration may take; it stops after the first step past it (a large model on a
/// slow host learns less at start-up and more from its first requests).
pub const CALIBRATION_TIME: Duration = Duration::from_secs(2);

/// Most sequences decoding together in a calibration step.
const MAX_DECODES: usize = 8;

/// The calibration's steps in order, as (decoding sequences, prompt tokens): prompt chunks
/// alone at growing positions, then decodes of 1 to 8 sequences (twice), then both together,
/// then 128-token chunks from position 480 to 1,248.
/// Nine steps with prompt tokens (counting the one that starts the decoding sequences) and
/// eight without: enough of each for the model to trust its prompt-token cost
/// ([`MIN_PREFILL_STEPS`](crate::steptime::MIN_PREFILL_STEPS)).
const STEPS: [(usize, usize); 22] = [
    (0, 16),
    (0, 32),
    (0, 64),
    (0, 128),
    (1, 0),
    (2, 0),
    (4, 0),
    (8, 0),
    (1, 0),
    (2, 0),
    (4, 0),
    (8, 0),
    (8, 16),
    (8, 48),
    (8, 96),
    (1, 64),
    // Deep into the context (sequence 0 is at 480 positions here): attention's share grows
    // with each chunk while the chunk stays the same size. A short context or a small step
    // budget ends the calibration before these (the model then learns attention from traffic).
    (0, 128),
    (0, 128),
    (0, 128),
    (0, 128),
    (0, 128),
    (0, 128),
];

/// Where the calibration's sequences are.
struct Seq {
    table: BlockTable,
    computed: usize,
}

/// Runs the calibration steps and returns each one as the engine would have planned it, with
/// its measured seconds. Sequence ids are `0..` (calibration's own). Stops early past
/// [`CALIBRATION_TIME`], at the context length, or when the pool cannot back a step; returns
/// nothing if the model fails.
pub fn calibrate(
    model: &Model,
    storage: &mut KvStorage,
    alloc: &SharedAllocator,
    (max_seqs, max_tokens, context): (usize, usize, usize),
) -> Vec<(Vec<Planned>, f64)> {
    let started = Instant::now();
    let decoders = MAX_DECODES.min(max_seqs.saturating_sub(1));
    // Sequence 0 takes the prompt chunks; 1..=decoders decode.
    let mut seqs: Vec<Seq> = (0..=decoders)
        .map(|_| Seq {
            table: BlockTable::new(alloc.clone()),
            computed: 0,
        })
        .collect();
    let mut out = Vec::new();
    // A first pass to warm caches and fault pages in, not learned from; then the decoding
    // sequences' prompts (16 tokens each, one step with prompt tokens).
    let warm_up = vec![(0, 16)];
    let starts: Vec<(usize, usize)> = (1..=decoders).map(|i| (i, 16)).collect();
    let shaped = STEPS.iter().map(|&(d, p)| {
        let mut chunks: Vec<(usize, usize)> = (1..=d.min(decoders)).map(|i| (i, 1)).collect();
        if p > 0 {
            chunks.push((0, p));
        }
        chunks
    });
    for (n, chunks) in std::iter::once(warm_up)
        .chain(std::iter::once(starts))
        .chain(shaped)
        .enumerate()
    {
        if started.elapsed() > CALIBRATION_TIME {
            break;
        }
        let Some(secs) = run_step(model, storage, &mut seqs, &chunks, (max_tokens, context)) else {
            break;
        };
        if n > 0 {
            let plan = chunks
                .iter()
                .map(|&(i, len)| Planned {
                    id: i as u64,
                    start: seqs[i].computed - len,
                    len,
                    samples: len == 1,
                })
                .collect();
            out.push((plan, secs));
        }
    }
    out
}

/// Runs one step of `chunks` (sequence, tokens) and returns its seconds; `None` when it does not
/// fit the step's token budget, the context or the pool, or the model fails.
fn run_step(
    model: &Model,
    storage: &mut KvStorage,
    seqs: &mut [Seq],
    chunks: &[(usize, usize)],
    (max_tokens, context): (usize, usize),
) -> Option<f64> {
    if chunks.is_empty() || chunks.iter().map(|c| c.1).sum::<usize>() > max_tokens {
        return None;
    }
    for &(i, len) in chunks {
        let end = seqs[i].computed + len;
        if end > context || !seqs[i].table.ensure(end) {
            return None;
        }
    }
    // Throwaway tokens: a step's time does not depend on which tokens it holds.
    let tokens: Vec<Vec<u32>> = chunks.iter().map(|&(_, len)| vec![1; len]).collect();
    let steps: Vec<SeqStep<'_>> = chunks
        .iter()
        .zip(&tokens)
        .map(|(&(i, len), t)| SeqStep {
            tokens: t,
            start: seqs[i].computed,
            // As the engine asks: decodes want their logits, prompt chunks mid-prompt do not.
            logits: if len == 1 {
                LogitsWanted::Last
            } else {
                LogitsWanted::None
            },
        })
        .collect();
    let tables: Vec<Vec<u32>> = chunks
        .iter()
        .map(|&(i, _)| seqs[i].table.blocks().to_vec())
        .collect();
    let t = Instant::now();
    model.forward_paged(storage, &tables, &steps).ok()?;
    let secs = t.elapsed().as_secs_f64();
    for &(i, len) in chunks {
        seqs[i].computed += len;
    }
    Some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steptime::{StepModel, StepShape};
    use crate::testing::TinyModel;

    #[test]
    fn calibration_gives_the_step_model_a_trusted_fit_and_gives_its_blocks_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel {
            context_length: 2048,
            ..TinyModel::default()
        }
        .write(&path)
        .unwrap();
        let model = Model::load(&crate::gguf::GgufFile::open(&path).unwrap()).unwrap();
        let (layers, width) = (model.config.n_layers, model.config.kv_width());
        let mut storage = KvStorage::new(layers, width, 128);
        let alloc = SharedAllocator::new(128);
        let steps = calibrate(&model, &mut storage, &alloc, (32, 256, 2048));
        assert_eq!(steps.len(), STEPS.len() + 1, "every step ran");
        // The last chunks are deep into the context.
        let last = &steps[steps.len() - 1].0;
        assert_eq!((last[0].start, last[0].len), (480 + 5 * 128, 128));
        assert_eq!(alloc.lock().used(), 0, "the calibration's blocks went back");
        let budget = |steps: &[(Vec<crate::scheduler::Planned>, f64)]| {
            let mut m = StepModel::default();
            for (plan, secs) in steps {
                assert!(*secs > 0.0);
                m.observe(crate::scheduler::step_shape(plan), *secs);
            }
            let decode = StepShape {
                decode_seqs: 8,
                ..StepShape::default()
            };
            m.prefill_budget(decode, 0, 1.0)
        };
        // This model's steps take tens of microseconds, so beside other tests' threads one
        // calibration's times can be noise enough for the fit to price a prompt token at
        // nothing (then it is not trusted for budgets, by design): one of three must fit.
        let trusted = |b: &Option<usize>| b.is_some_and(|b| b > 0);
        let mut fitted = vec![budget(&steps)];
        while fitted.len() < 3 && !fitted.iter().any(trusted) {
            let again = calibrate(&model, &mut storage, &alloc, (32, 256, 2048));
            fitted.push(budget(&again));
        }
        assert!(fitted.iter().any(trusted), "{fitted:?}");
    }

    #[test]
    fn a_small_pool_or_context_stops_calibration_early() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyModel::default().write(&path).unwrap();
        let model = Model::load(&crate::gguf::GgufFile::open(&path).unwrap()).unwrap();
        let (layers, width) = (model.config.n_layers, model.config.kv_width());
        let mut storage = KvStorage::new(layers, width, 4);
        let alloc = SharedAllocator::new(4);
        let steps = calibrate(&model, &mut storage, &alloc, (32, 256, 64));
        assert!(steps.len() < STEPS.len(), "{}", steps.len());
        assert_eq!(alloc.lock().used(), 0);
    }
}
