//! The paged KV cache: a pool of fixed-size blocks allocated once at start-up, per-sequence
//! block tables, reference counts, an O(1) free list, and an index of full blocks by the chained
//! hash of their tokens (automatic prefix caching, evicted LRU among unreferenced blocks).
//!
//! Metadata ([`BlockAllocator`]) and storage ([`KvStorage`]) are separate: the storage is read in
//! parallel during attention, the metadata changes only between steps. Blocks go back to the pool
//! when their [`BlockTable`] is dropped, on every path (finish, stop, error, cancel, preemption).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rustc_hash::FxHashMap;

use crate::kv::KvCache;
pub use crate::kv::BLOCK_TOKENS;

pub type BlockId = u32;

/// Chained hash of a full block: depends on every token before it, so equal hashes mean equal
/// prefixes. Keyed with a per-process random key, so no client can craft colliding prefixes.
pub fn block_hash(prev: u64, tokens: &[u32]) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut h = KEY.get_or_init(std::hash::RandomState::new).build_hasher();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct BlockAllocator {
    refcount: Vec<u32>,
    free: Vec<BlockId>,
    /// Hash of a registered (full, immutable) block.
    hash_of: Vec<Option<u64>>,
    /// The keys are already keyed hashes ([`block_hash`]: no client can choose them), so the
    /// map needs no second keyed hash over them: FxHash's one multiply spreads them.
    by_hash: FxHashMap<u64, BlockId>,
    /// Cached blocks nobody references, by last-use tick: evicted oldest first.
    evictable: BTreeMap<u64, BlockId>,
    last_use: Vec<u64>,
    tick: u64,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> Self {
        BlockAllocator {
            refcount: vec![0; n_blocks],
            // Reversed so block 0 is handed out first (only cosmetic).
            free: (0..n_blocks as BlockId).rev().collect(),
            hash_of: vec![None; n_blocks],
            by_hash: FxHashMap::default(),
            evictable: BTreeMap::new(),
            last_use: vec![0; n_blocks],
            tick: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks that can be handed out now (free, or cached and unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    pub fn refcount(&self, id: BlockId) -> u32 {
        self.refcount[id as usize]
    }

    /// A fresh block (refcount 1), evicting the least recently used cached block if need be.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (&tick, &id) = self.evictable.iter().next()?;
                self.evictable.remove(&tick);
                if let Some(h) = self.hash_of[id as usize].take() {
                    self.by_hash.remove(&h);
                }
                id
            }
        };
        debug_assert_eq!(self.refcount[id as usize], 0);
        self.refcount[id as usize] = 1;
        Some(id)
    }

    fn retain(&mut self, id: BlockId) {
        let i = id as usize;
        if self.refcount[i] == 0 {
            self.evictable.remove(&self.last_use[i]);
        }
        self.refcount[i] += 1;
    }

    pub fn release(&mut self, id: BlockId) {
        let i = id as usize;
        assert!(
            self.refcount[i] > 0,
            "block {id} released more often than retained"
        );
        self.refcount[i] -= 1;
        if self.refcount[i] == 0 {
            if self.hash_of[i].is_some() {
                self.tick += 1;
                self.last_use[i] = self.tick;
                self.evictable.insert(self.tick, id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Records a full block under its chained hash so later sequences can share it.
    pub fn register(&mut self, id: BlockId, hash: u64) {
        if self.hash_of[id as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.hash_of[id as usize] = Some(hash);
            self.by_hash.insert(hash, id);
        }
    }

    /// The cached block with this hash, retained for the caller.
    pub fn lookup(&mut self, hash: u64) -> Option<BlockId> {
        let id = *self.by_hash.get(&hash)?;
        self.retain(id);
        Some(id)
    }

    /// Checks the bookkeeping invariants (tests and debug assertions).
    pub fn check_invariants(&self) {
        let mut seen = vec![false; self.total()];
        for &id in &self.free {
            assert!(!seen[id as usize], "block {id} twice in the free list");
            seen[id as usize] = true;
            assert_eq!(self.refcount[id as usize], 0);
            assert!(self.hash_of[id as usize].is_none());
        }
        for &id in self.evictable.values() {
            assert!(!seen[id as usize], "block {id} both free and evictable");
            seen[id as usize] = true;
            assert_eq!(self.refcount[id as usize], 0);
            assert!(self.hash_of[id as usize].is_some());
        }
        for (i, &s) in seen.iter().enumerate() {
            assert_eq!(
                s,
                self.refcount[i] == 0,
                "block {i}: refcount {} but listed={s}",
                self.refcount[i]
            );
        }
        for (&h, &id) in &self.by_hash {
            assert_eq!(self.hash_of[id as usize], Some(h));
        }
    }
}

/// Shared handle to the allocator (the engine thread is its only user; the mutex is uncontended).
#[derive(Debug, Clone)]
pub struct SharedAllocator(Arc<Mutex<BlockAllocator>>);

impl SharedAllocator {
    pub fn new(n_blocks: usize) -> Self {
        SharedAllocator(Arc::new(Mutex::new(BlockAllocator::new(n_blocks))))
    }

    pub fn lock(&self) -> MutexGuard<'_, BlockAllocator> {
        // A panic elsewhere never leaves the allocator half-updated (every method completes or
        // asserts before mutating), so a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One sequence's blocks, in position order. Dropping it returns them to the pool.
#[derive(Debug)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    alloc: SharedAllocator,
}

impl BlockTable {
    pub fn new(alloc: SharedAllocator) -> Self {
        BlockTable {
            blocks: Vec::new(),
            alloc,
        }
    }

    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Grows the table to cover `positions` positions; false (and no change) if the pool is short.
    pub fn ensure(&mut self, positions: usize) -> bool {
        let need = positions.div_ceil(BLOCK_TOKENS);
        if need <= self.blocks.len() {
            return true;
        }
        let mut a = self.alloc.lock();
        if a.available() < need - self.blocks.len() {
            return false;
        }
        while self.blocks.len() < need {
            match a.allocate() {
                Some(id) => self.blocks.push(id),
                None => return false,
            }
        }
        true
    }

    /// A new table holding this table's first `n` blocks (retained for it).
    pub fn share(&self, n: usize) -> BlockTable {
        let blocks = self.blocks[..n.min(self.blocks.len())].to_vec();
        let mut a = self.alloc.lock();
        for &id in &blocks {
            a.retain(id);
        }
        BlockTable {
            blocks,
            alloc: self.alloc.clone(),
        }
    }

    /// Appends cached blocks matching `hashes` in order; returns how many matched.
    pub fn adopt_cached(&mut self, hashes: &[u64]) -> usize {
        let mut a = self.alloc.lock();
        let mut n = 0;
        for &h in hashes {
            match a.lookup(h) {
                Some(id) => {
                    self.blocks.push(id);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Registers the table's `i`-th block as full with chained hash `hash`.
    pub fn register(&self, i: usize, hash: u64) {
        if let Some(&id) = self.blocks.get(i) {
            self.alloc.lock().register(id, hash);
        }
    }

    /// Releases every block (preemption); the table stays usable.
    pub fn clear(&mut self) {
        let mut a = self.alloc.lock();
        for id in self.blocks.drain(..) {
            a.release(id);
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The block storage: K and V in f16 for every block, layer and slot, allocated once.
pub struct KvStorage {
    n_layers: usize,
    width: usize,
    /// f16 bit patterns: `u16` so that `vec![0; n]` is a zeroed allocation the OS commits lazily
    /// (a `vec!` of `f16` would write every element up front).
    data: Vec<u16>,
}

impl std::fmt::Debug for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvStorage({} blocks x {} layers x {} wide)",
            self.n_blocks(),
            self.n_layers,
            self.width
        )
    }
}

impl KvStorage {
    /// Bytes one block takes for a model with `n_layers` layers of `width`-wide K and V.
    pub fn block_bytes(n_layers: usize, width: usize) -> usize {
        n_layers * 2 * BLOCK_TOKENS * width * std::mem::size_of::<f16>()
    }

    pub fn new(n_layers: usize, width: usize, n_blocks: usize) -> Self {
        KvStorage {
            n_layers,
            width,
            data: vec![0u16; n_blocks * n_layers * 2 * BLOCK_TOKENS * width],
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.data.len() / (self.n_layers * 2 * BLOCK_TOKENS * self.width).max(1)
    }

    #[inline]
    fn offset(&self, block: BlockId, layer: usize, kv: usize, slot: usize) -> usize {
        (((block as usize * self.n_layers + layer) * 2 + kv) * BLOCK_TOKENS + slot) * self.width
    }
}

/// One step's view of the paged cache: step sequence `i` uses block table `tables[i]`.
pub struct PagedStep<'a> {
    pub storage: &'a mut KvStorage,
    pub tables: Vec<&'a [BlockId]>,
}

impl KvCache for PagedStep<'_> {
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let block = self.tables[seq][pos / BLOCK_TOKENS];
        let (w, slot) = (self.storage.width, pos % BLOCK_TOKENS);
        // Values as a row; slice conversions use F16C where the CPU has it.
        let at = self.storage.offset(block, layer, 1, slot);
        let dst: &mut [f16] = self.storage.data[at..at + w].reinterpret_cast_mut();
        dst.convert_from_f32_slice(&v[..w]);
        // Keys transposed: dimension c of this position at c * BLOCK_TOKENS + slot.
        let base = self.storage.offset(block, layer, 0, 0) + slot;
        let mut buf = [f16::ZERO; 64];
        for (c0, chunk) in k[..w].chunks(buf.len()).enumerate() {
            let b = &mut buf[..chunk.len()];
            b.convert_from_f32_slice(chunk);
            for (i, x) in b.iter().enumerate() {
                self.storage.data[base + (c0 * 64 + i) * BLOCK_TOKENS] = x.to_bits();
            }
        }
    }

    fn block_tokens(&self) -> usize {
        BLOCK_TOKENS
    }

    fn block(&self, seq: usize, layer: usize, value: bool, i: usize) -> &[u16] {
        let at = self
            .storage
            .offset(self.tables[seq][i], layer, usize::from(value), 0);
        &self.storage.data[at..at + BLOCK_TOKENS * self.storage.width]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A new sequence grows to this many positions (sharing cached prefixes where it can).
        Grow(usize, u8),
        /// Drop the sequence at this index (mod live count).
        Drop(usize),
        /// Register the full blocks of the sequence at this index.
        Register(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..80, 0u8..3).prop_map(|(n, p)| Op::Grow(n, p)),
            (0usize..8).prop_map(Op::Drop),
            (0usize..8).prop_map(Op::Register)
        ]
    }

    /// Tokens of a sequence with prefix family `p`: sequences of one family share prefixes.
    fn tokens(p: u8, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + p as u32 * 1000).collect()
    }

    fn hashes(toks: &[u32]) -> Vec<u64> {
        let mut h = 0;
        toks.chunks_exact(BLOCK_TOKENS)
            .map(|c| {
                h = block_hash(h, c);
                h
            })
            .collect()
    }

    proptest! {
        /// Against a reference model: free + used = total, refcounts equal the number of tables
        /// holding a block, a cache hit returns a block registered for the same tokens, and
        /// everything is free again at the end.
        #[test]
        fn allocator_state_machine(ops in proptest::collection::vec(op(), 1..60)) {
            let alloc = SharedAllocator::new(12);
            let mut live: Vec<(BlockTable, Vec<u32>)> = Vec::new();
            // Reference: which tokens each registered block holds.
            let mut content: HashMap<BlockId, Vec<u32>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Grow(n, p) => {
                        let toks = tokens(p, n);
                        let mut t = BlockTable::new(alloc.clone());
                        let hit = t.adopt_cached(&hashes(&toks[..n - 1]));
                        for (i, &id) in t.blocks().iter().enumerate() {
                            prop_assert_eq!(content.get(&id).map(Vec::as_slice), Some(&toks[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]));
                        }
                        prop_assert!(hit * BLOCK_TOKENS < n);
                        if t.ensure(n) {
                            live.push((t, toks));
                        }
                    }
                    Op::Drop(i) if !live.is_empty() => {
                        live.remove(i % live.len());
                    }
                    Op::Register(i) if !live.is_empty() => {
                        let (t, toks) = &live[i % live.len()];
                        for (b, h) in hashes(toks).into_iter().enumerate() {
                            let id = t.blocks()[b];
                            let was = alloc.lock().hash_of[id as usize].is_some();
                            t.register(b, h);
                            if !was && alloc.lock().hash_of[id as usize] == Some(h) {
                                content.insert(id, toks[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS].to_vec());
                            }
                        }
                    }
                    _ => {}
                }
                let a = alloc.lock();
                a.check_invariants();
                prop_assert_eq!(a.used() + a.available(), a.total());
                let mut owners = vec![0u32; a.total()];
                for (t, _) in &live {
                    for &id in t.blocks() {
                        owners[id as usize] += 1;
                    }
                }
                for (id, &n) in owners.iter().enumerate() {
                    prop_assert_eq!(a.refcount(id as BlockId), n);
                    // A block evicted for reuse forgets its content.
                    if n == 0 && a.hash_of[id].is_none() {
                        content.remove(&(id as BlockId));
                    }
                }
                drop(a);
            }
            live.clear();
            let a = alloc.lock();
            prop_assert_eq!(a.available(), a.total());
            a.check_invariants();
        }
    }

    #[test]
    fn storage_round_trips_through_f16() {
        let mut s = KvStorage::new(2, 8, 3);
        let table = [2u32, 0];
        let mut step = PagedStep {
            storage: &mut s,
            tables: vec![&table],
        };
        let k: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        step.write(0, 1, 17, &k, &v);
        // Position 17 is slot 1 of the sequence's second block (block id 0): row 1 of its
        // values, column 1 of its transposed keys.
        let f32_of = |b: &u16| f16::from_bits(*b).to_f32();
        let values = step.block(0, 1, true, 1);
        assert_eq!(values.len(), BLOCK_TOKENS * 8);
        assert_eq!(values[8..16].iter().map(f32_of).collect::<Vec<_>>(), v);
        let keys = step.block(0, 1, false, 1);
        assert_eq!(keys.len(), BLOCK_TOKENS * 8);
        let col: Vec<f32> = (0..8)
            .map(|c| f32_of(&keys[c * BLOCK_TOKENS + 1]))
            .collect();
        assert_eq!(col, k);
    }

    #[test]
    fn lru_evicts_oldest_unreferenced_cached_block() {
        let alloc = SharedAllocator::new(2);
        let mut a = alloc.lock();
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        a.register(x, 1);
        a.register(y, 2);
        a.release(x);
        a.release(y);
        assert_eq!(a.available(), 2);
        let z = a.allocate().unwrap();
        assert_eq!(z, x, "x was released first");
        assert!(a.lookup(1).is_none());
        assert_eq!(a.lookup(2), Some(y));
        a.check_invariants();
    }
}
