//! Heap allocations on the decode hot path, counted by a wrapping global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use serrano_engine::gguf::GgufFile;
use serrano_engine::model::{LogitsWanted, Model, SeqStep};
use serrano_engine::paged::{BlockId, KvStorage, PagedStep, BLOCK_TOKENS};
use serrano_engine::testing::TinyModel;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations per decode step of one sequence.
fn per_decode_token(layers: u32) -> usize {
    let tiny = TinyModel {
        n_layers: layers,
        ..TinyModel::default()
    };
    let model = Model::load(&GgufFile::from_vec(tiny.gguf_bytes()).unwrap()).unwrap();
    let c = &model.config;
    let per = c.context_length.div_ceil(BLOCK_TOKENS);
    let mut storage = KvStorage::new(c.n_layers, c.kv_width(), per);
    let table: Vec<BlockId> = (0..per as BlockId).collect();
    let mut run = |tokens: &[u32], start: usize| {
        let mut step = PagedStep {
            storage: &mut storage,
            tables: vec![&table],
        };
        let s = SeqStep {
            tokens,
            start,
            logits: LogitsWanted::Last,
        };
        model.forward(&mut step, &[s]).unwrap()
    };
    // Warm-up: a 32-token prefill sizes every per-thread buffer (activations, attention
    // scores) beyond what the measured steps need, whichever workers run their tasks; the
    // decode steps then rewrite positions 8.. of the same sequence.
    let warm: Vec<u32> = (1..=32).collect();
    run(&warm, 0);
    let steps = 16;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..steps {
        run(&[10 + i as u32], 8 + i);
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) / steps
}

/// The forward pass, its matmuls and attention keep their working memory in per-thread
/// buffers, so a decode step allocates only what it hands back, whatever the depth: the logits
/// (the outer list and one vector per sequence), plus this test's own list of block tables.
#[test]
fn decode_allocations_do_not_grow_with_layers() {
    let (two, six) = (per_decode_token(2), per_decode_token(6));
    println!("allocations per decode token: {two} (2 layers), {six} (6 layers)");
    assert_eq!(two, six, "an op allocates per layer");
    assert!(two <= 3, "{two} allocations per decode token");
}
