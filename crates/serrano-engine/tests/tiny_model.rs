//! Engine behaviour on a tiny random-weight GGUF written by the test itself.

use serrano_engine::gguf::GgufFile;
use serrano_engine::model::{LogitsWanted, Model, SeqStep};
use serrano_engine::paged::{BlockId, KvStorage, PagedStep, BLOCK_TOKENS};
use serrano_engine::testing::TinyModel;
use serrano_engine::{
    start_from_gguf, EngineConfig, Event, FinishReason, GenerateRequest, SamplingParams,
    SubmitError,
};

fn tiny() -> GgufFile {
    GgufFile::from_vec(TinyModel::default().gguf_bytes()).unwrap()
}

/// A KV pool big enough for `seqs` sequences of the whole context, and each sequence's blocks.
struct Kv {
    storage: KvStorage,
    tables: Vec<Vec<BlockId>>,
}

fn kv(m: &Model, seqs: usize) -> Kv {
    let per = m.config.context_length.div_ceil(BLOCK_TOKENS);
    let storage = KvStorage::new(m.config.n_layers, m.config.kv_width(), per * seqs);
    // Interleave the sequences' blocks, as a shared pool would.
    let tables = (0..seqs)
        .map(|s| (0..per).map(|b| (b * seqs + s) as BlockId).collect())
        .collect();
    Kv { storage, tables }
}

fn forward(m: &Model, kv: &mut Kv, steps: &[SeqStep<'_>]) -> serrano_engine::Result<Vec<Vec<f32>>> {
    let mut step = PagedStep {
        storage: &mut kv.storage,
        tables: kv.tables.iter().map(Vec::as_slice).collect(),
    };
    m.forward(&mut step, steps)
}

fn step(tokens: &[u32], start: usize, logits: LogitsWanted) -> SeqStep<'_> {
    SeqStep {
        tokens,
        start,
        logits,
    }
}

#[test]
fn incremental_decode_matches_full_prefill() {
    let model = Model::load(&tiny()).unwrap();
    let prompt = [
        5u32, 77, 260, 12, 9, 140, 3, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
    ];
    let mut full = kv(&model, 1);
    let all = forward(&model, &mut full, &[step(&prompt, 0, LogitsWanted::All)])
        .unwrap()
        .remove(0);
    let v = model.config.vocab_size;
    let mut inc = kv(&model, 1);
    for (i, t) in prompt.iter().enumerate() {
        let row = forward(
            &model,
            &mut inc,
            &[step(std::slice::from_ref(t), i, LogitsWanted::Last)],
        )
        .unwrap()
        .remove(0);
        // Bit for bit: matmul tiles and attention tiles give a token the same operations
        // whichever tokens share its step.
        for (a, b) in row.iter().zip(&all[i * v..(i + 1) * v]) {
            assert_eq!(a.to_bits(), b.to_bits(), "position {i}: {a} vs {b}");
        }
    }
}

#[test]
fn a_sequence_gets_the_same_logits_alone_or_in_a_batch() {
    let model = Model::load(&tiny()).unwrap();
    let (a, b) = ([1u32, 2, 3, 4], [200u32, 100]);
    let alone = |toks: &[u32]| {
        let mut c = kv(&model, 1);
        forward(&model, &mut c, &[step(toks, 0, LogitsWanted::Last)])
            .unwrap()
            .remove(0)
    };
    let mut k2 = kv(&model, 2);
    let both = forward(
        &model,
        &mut k2,
        &[
            step(&a, 0, LogitsWanted::Last),
            step(&b, 0, LogitsWanted::Last),
        ],
    )
    .unwrap();
    assert_eq!(both[0], alone(&a));
    assert_eq!(both[1], alone(&b));
}

#[test]
fn out_of_vocabulary_and_over_context_are_errors() {
    let model = Model::load(&tiny()).unwrap();
    let mut c = kv(&model, 1);
    assert!(forward(&model, &mut c, &[step(&[100_000], 0, LogitsWanted::Last)]).is_err());
    let long = vec![1u32; model.config.context_length + 1];
    assert!(forward(&model, &mut c, &[step(&long, 0, LogitsWanted::Last)]).is_err());
}

fn collect(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> (Vec<u32>, String, FinishReason, usize) {
    let (mut ids, mut text) = (vec![], String::new());
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => return (ids, text, reason, completion_tokens),
            Event::PromptLogprobs(_) => {}
            Event::Error(e) => panic!("{e}"),
        }
    }
    panic!("stream ended without Finished");
}

#[test]
fn engine_generates_streams_and_finishes_by_length() {
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    let mut req = GenerateRequest::new(vec![1, 2, 3], 12);
    req.ignore_eos = true;
    let mut rx = h.submit(req).unwrap();
    let (ids, _, reason, n) = collect(&mut rx);
    assert_eq!((ids.len(), reason, n), (12, FinishReason::Length, 12));
}

/// The engine says when its start-up (calibrated or not) is done, and stays started.
#[test]
fn an_engine_says_when_it_has_started() {
    use std::time::Duration;
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    assert!(h.wait_started(Duration::from_secs(60)));
    // Started stays started.
    assert!(h.wait_started(Duration::ZERO));
    let uncalibrated = EngineConfig {
        calibrate: false,
        ..EngineConfig::default()
    };
    let h = start_from_gguf(&tiny(), uncalibrated).unwrap();
    assert!(h.wait_started(Duration::from_secs(60)));
}

#[test]
fn same_seed_same_output_even_under_concurrency() {
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    let req = |seed| {
        let mut r = GenerateRequest::new(vec![10, 20, 30], 16);
        r.ignore_eos = true;
        r.sampling = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        r
    };
    let first = collect(&mut h.submit(req(7)).unwrap()).0;
    // Now with company in the batch.
    let mut rxs: Vec<_> = (0..4).map(|i| h.submit(req(7 + i)).unwrap()).collect();
    let outs: Vec<_> = rxs.iter_mut().map(|rx| collect(rx).0).collect();
    assert_eq!(outs[0], first);
    assert_ne!(outs[1], first);
}

#[test]
fn stop_token_ids_and_prompt_logprobs() {
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    let mut probe = GenerateRequest::new(vec![1, 2, 3], 3);
    probe.ignore_eos = true;
    let (ids, ..) = collect(&mut h.submit(probe).unwrap());
    let mut req = GenerateRequest::new(vec![1, 2, 3], 3);
    req.ignore_eos = true;
    req.stop_token_ids = vec![ids[1]];
    req.prompt_logprobs = Some(2);
    let mut rx = h.submit(req).unwrap();
    match rx.blocking_recv() {
        Some(Event::PromptLogprobs(p)) => {
            assert_eq!(p.len(), 3);
            assert!(p[0].is_none());
            assert_eq!(p[1].as_ref().unwrap().token, 2);
            assert_eq!(p[2].as_ref().unwrap().top.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    let (got, _, reason, _) = collect(&mut rx);
    let first = ids.iter().position(|&t| t == ids[1]).unwrap();
    assert_eq!((got.len(), reason), (first + 1, FinishReason::Stop));
}

#[test]
fn invalid_requests_are_refused_before_queueing() {
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    assert!(matches!(
        h.submit(GenerateRequest::new(vec![], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        h.submit(GenerateRequest::new(vec![1], 10_000)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        h.submit(GenerateRequest::new(vec![999_999], 1)),
        Err(SubmitError::Invalid(_))
    ));
}

#[test]
fn a_dropped_receiver_cancels_and_the_engine_keeps_serving() {
    let h = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    let mut long = GenerateRequest::new(vec![1, 2], 200);
    long.ignore_eos = true;
    drop(h.submit(long).unwrap());
    let mut req = GenerateRequest::new(vec![1, 2], 4);
    req.ignore_eos = true;
    assert_eq!(collect(&mut h.submit(req).unwrap()).3, 4);
}

#[test]
fn unsupported_architecture_is_named() {
    use serrano_engine::gguf::{GgufWriter, Value};
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("falcon".into()));
    let err = Model::load(&GgufFile::from_vec(w.to_bytes()).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("falcon") && err.contains("llama"), "{err}");
}

#[test]
fn every_weight_type_loads_and_runs() {
    use serrano_engine::quant::DType;
    for wt in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
    ] {
        let bytes = TinyModel {
            weight_type: wt,
            ..Default::default()
        }
        .gguf_bytes();
        let model = Model::load(&GgufFile::from_vec(bytes).unwrap()).unwrap();
        let mut c = kv(&model, 1);
        let logits = forward(&model, &mut c, &[step(&[1, 2, 3], 0, LogitsWanted::Last)])
            .unwrap()
            .remove(0);
        assert!(logits.iter().all(|l| l.is_finite()), "{wt:?}");
    }
}

#[test]
fn qwen2_loads_with_biases_and_neox_rope() {
    let bytes = TinyModel {
        architecture: "qwen2",
        ..Default::default()
    }
    .gguf_bytes();
    let model = Model::load(&GgufFile::from_vec(bytes).unwrap()).unwrap();
    assert_eq!(
        model.config.rope_style,
        serrano_engine::ops::RopeStyle::Neox
    );
    let mut c = kv(&model, 1);
    let logits = forward(&model, &mut c, &[step(&[1, 2, 3], 0, LogitsWanted::Last)])
        .unwrap()
        .remove(0);
    assert!(logits.iter().all(|l| l.is_finite()));
}

/// Prompt log-probs and outputs do not depend on how the prompt was chunked (or on the pool size
/// forcing preemptions): a 40-token prompt through 8-token steps equals one 512-token step.
#[test]
fn chunked_prefill_gives_the_same_prompt_logprobs_and_tokens() {
    let run = |max_batch_tokens: usize| {
        let cfg = EngineConfig {
            max_batch_tokens,
            kv_cache_bytes: 1 << 20,
            ..EngineConfig::default()
        };
        let h = start_from_gguf(&tiny(), cfg).unwrap();
        let mut req = GenerateRequest::new((0..40).map(|i| (i * 13 % 250) as u32).collect(), 10);
        req.ignore_eos = true;
        req.prompt_logprobs = Some(2);
        let mut rx = h.submit(req).unwrap();
        let prompt_lp = match rx.blocking_recv() {
            Some(Event::PromptLogprobs(p)) => p,
            other => panic!("{other:?}"),
        };
        (prompt_lp, collect(&mut rx).0)
    };
    let (lp_small, toks_small) = run(8);
    let (lp_big, toks_big) = run(512);
    assert_eq!(lp_small.len(), 40);
    assert_eq!(toks_small, toks_big);
    for (a, b) in lp_small.iter().zip(&lp_big) {
        assert_eq!(
            a.as_ref()
                .map(|x| (x.token, x.top.iter().map(|t| t.0).collect::<Vec<_>>())),
            b.as_ref()
                .map(|x| (x.token, x.top.iter().map(|t| t.0).collect::<Vec<_>>()))
        );
        if let (Some(a), Some(b)) = (a, b) {
            assert!((a.logprob - b.logprob).abs() < 1e-5);
        }
    }
}

#[test]
fn a_request_that_can_never_fit_the_pool_is_refused() {
    // 4096 bytes per block for the tiny model: 8 blocks = 128 tokens.
    let cfg = EngineConfig {
        kv_cache_bytes: 8 * 4096,
        ..EngineConfig::default()
    };
    let h = start_from_gguf(&tiny(), cfg).unwrap();
    // The served context shrinks to what the pool holds, so the limit is named up front.
    assert_eq!(h.info().context_length, 128);
    let err = h
        .submit(GenerateRequest::new(vec![1; 100], 100))
        .unwrap_err();
    assert!(
        matches!(&err, SubmitError::Invalid(m) if m.contains("128")),
        "{err:?}"
    );
    let mut ok = GenerateRequest::new(vec![1; 60], 60);
    ok.ignore_eos = true;
    assert_eq!(collect(&mut h.submit(ok).unwrap()).3, 60);
}

/// Many sequences through a pool too small for all of them at once: preemption and recompute
/// give every one the same tokens it gets alone.
#[test]
fn preemption_recomputes_to_the_same_output() {
    let req = |i: u32| {
        let mut r = GenerateRequest::new(vec![i + 1, 7, 9, i + 2], 40);
        r.ignore_eos = true;
        r
    };
    let alone = start_from_gguf(&tiny(), EngineConfig::default()).unwrap();
    let want: Vec<Vec<u32>> = (0..6)
        .map(|i| collect(&mut alone.submit(req(i)).unwrap()).0)
        .collect();
    // 6 blocks = 96 tokens for 6 sequences of 44: most steps must preempt someone.
    let small = start_from_gguf(
        &tiny(),
        EngineConfig {
            kv_cache_bytes: 6 * 4096,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let mut rxs: Vec<_> = (0..6).map(|i| small.submit(req(i)).unwrap()).collect();
    for (rx, w) in rxs.iter_mut().zip(&want) {
        assert_eq!(&collect(rx).0, w);
    }
    let text = small.metrics().encode();
    let preemptions: f64 = text
        .lines()
        .find(|l| l.starts_with("serrano:num_preemptions_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(preemptions > 0.0, "the pool was meant to force preemptions");
}

/// With prefix caching off, a repeated prompt is computed again (no hits), with the same output;
/// with it on, the second one reuses the first one's full blocks.
#[test]
fn prefix_caching_can_be_turned_off() {
    let run = |prefix_caching: bool| {
        let h = start_from_gguf(
            &tiny(),
            EngineConfig {
                prefix_caching,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let req = || {
            let mut r = GenerateRequest::new((0..70).map(|i| (i * 7 % 250) as u32).collect(), 8);
            r.ignore_eos = true;
            r
        };
        let a = collect(&mut h.submit(req()).unwrap());
        let b = collect(&mut h.submit(req()).unwrap());
        assert_eq!(a.0, b.0);
        (a.0, h.metrics().prefix_cache_hits.get())
    };
    let (on, hits_on) = run(true);
    let (off, hits_off) = run(false);
    assert_eq!(on, off);
    assert_eq!(hits_on, 64, "the second prompt reuses its 4 full blocks");
    assert_eq!(hits_off, 0);
}

/// The `_sum` of one of the engine's histograms, from its Prometheus text.
fn histogram_sum(h: &serrano_engine::EngineHandle, name: &str) -> f64 {
    let text = h.metrics().encode();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}_sum")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}_sum in:\n{text}"))
}

/// The choices of one prompt (`n > 1`) compute it once, even with prefix caching off: the
/// first computes all 70 prompt tokens, the others share its 4 full blocks and compute only
/// the last 6; each choice samples exactly what it would alone with its seed.
#[test]
fn choices_of_one_prompt_compute_it_once() {
    let h = start_from_gguf(
        &tiny(),
        EngineConfig {
            prefix_caching: false,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let prompt: Vec<u32> = (0..70).map(|i| (i * 7 % 250) as u32).collect();
    let req = |seed: u64| {
        let mut r = GenerateRequest::new(prompt.clone(), 8);
        r.ignore_eos = true;
        r.sampling = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        r
    };
    let alone: Vec<Vec<u32>> = (0..4)
        .map(|i| collect(&mut h.submit(req(40 + i)).unwrap()).0)
        .collect();
    assert!(alone.windows(2).any(|w| w[0] != w[1]), "seeds differ");
    let name = "serrano:iteration_tokens_total";
    let before = histogram_sum(&h, name);
    let mut rxs = h.submit_n((0..4).map(|i| req(40 + i)).collect()).unwrap();
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(collect(rx).0, alone[i], "choice {i}");
    }
    let stepped = histogram_sum(&h, name) - before;
    // The prompt once, three tails of 70 - 4 x 16 tokens, 7 decode steps per choice.
    assert_eq!(stepped, (70 + 3 * 6 + 4 * 7) as f64);
    // And nothing is left behind (the gauge is set after the step that sent the last event).
    let t = std::time::Instant::now();
    while h.metrics().kv_cache_usage_perc.get() != 0.0 {
        assert!(t.elapsed().as_secs() < 5, "blocks still held");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
