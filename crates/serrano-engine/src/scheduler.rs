//! Iteration-level scheduling: which tokens of which sequences go into the next forward step.
//!
//! Prefill and decode are one mechanism: a sequence has `tokens` (prompt, then everything it
//! generated) of which the first `computed` have KV. Each step gives every running sequence a
//! chunk of its uncomputed tokens (a decode is a chunk of one), decodes first, then prefill
//! chunks oldest first (interactive sequences' and admissions before batch ones'), all under a
//! token budget and a sequence cap, so a long prompt is prefilled in chunks and never freezes
//! running decodes. Waiting sequences are admitted fairly across tenants (lowest served tokens
//! first, higher priority before that, earliest deadline breaking ties). When a
//! step needs a block and the pool is dry, the newest running sequence is preempted: its blocks
//! go back and it is recomputed later (the prefix cache often makes that cheap). The oldest
//! sequence is never the victim while another runs, so every admitted sequence finishes.
//!
//! The scheduler is generic over a payload `P` (the engine's sampler and channels), so its
//! invariants are property-tested without a model.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::paged::{block_hash, BlockTable, SharedAllocator, BLOCK_TOKENS};
use crate::steptime::StepShape;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one step.
    pub max_batch_tokens: usize,
}

pub type SeqId = u64;

/// A sequence's latency class. Interactive sequences are admitted and prefilled first, and
/// their decodes cap the step's prompt tokens (see `schedule_within`); batch sequences take what
/// is left, are preempted first, and wait at most [`BATCH_PATIENCE_STEPS`] behind interactive
/// ones before they are admitted as if interactive: deferred, never starved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SloClass {
    #[default]
    Interactive,
    Batch,
}

impl SloClass {
    pub fn as_str(self) -> &'static str {
        match self {
            SloClass::Interactive => "interactive",
            SloClass::Batch => "batch",
        }
    }
}

/// How urgent a sequence is: where it queues and what its decodes are owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Urgency {
    /// Higher is admitted first.
    pub priority: i32,
    pub class: SloClass,
    /// When its first token is due, on the caller's clock (any unit, only compared): within a
    /// tenant's queue the earliest deadline goes first (after priority), and it breaks ties
    /// between equally served tenants. The scheduler reads no clock, so a simulator can drive
    /// it with a virtual one.
    pub deadline: u64,
    /// The inter-token gap its decodes must keep; `None`: none (batch, or targets off).
    pub itl_target: Option<Duration>,
}

/// Steps a waiting batch sequence may be passed over by interactive ones (at 30-100 ms a step,
/// 30 s to a few minutes).
pub const BATCH_PATIENCE_STEPS: u64 = 1000;

/// Most steps running in which batch decodes sit out for an interactive prompt; then they
/// decode one step.
pub const BATCH_SIT_OUT_RUN: u32 = 3;

/// Fewest prompt tokens a step under a prefill cap still takes (one KV block): however busy
/// the decodes, a prompt's prefill advances.
pub const MIN_PREFILL_CHUNK: usize = BLOCK_TOKENS;

#[derive(Debug)]
pub struct Entry<P> {
    pub id: SeqId,
    pub tenant: Arc<str>,
    pub urgency: Urgency,
    /// The step count when it was queued (its wait, for batch patience).
    queued_at: u64,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose KV is in `table`.
    pub computed: usize,
    /// Never exceeded: prompt + max_tokens (checked against the pool at submission).
    pub max_len: usize,
    pub table: BlockTable,
    /// May reuse cached prefix blocks (not when every prompt position's logits are wanted).
    cacheable: bool,
    /// Full blocks already registered in the prefix cache.
    registered: usize,
    /// The prefix hash chain as far as it was computed: (blocks, hash of blocks `0..blocks`).
    /// Tokens are only appended, so it stays right and each step hashes only new blocks.
    hashed: (usize, u64),
    arrival: u64,
    /// The step in which it was last preempted: it is not readmitted in that same step.
    preempted_in: Option<u64>,
    pub payload: P,
}

/// One sequence's part of a planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub id: SeqId,
    /// First position of the chunk (`computed` before the step).
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of `tokens`: the step's logits sample the next token.
    pub samples: bool,
}

/// What a planned step holds, for the step-time model. A chunk of one token costs what a
/// decode costs, whatever its position.
pub fn step_shape(plan: &[Planned]) -> StepShape {
    let mut shape = StepShape::default();
    for p in plan {
        if p.len == 1 {
            shape.decode_seqs += 1;
        } else {
            shape.prefill_tokens += p.len;
        }
        shape.kv_tokens += crate::steptime::chunk_kv_tokens(p.start, p.len);
    }
    shape
}

/// Caps on one step's prompt tokens, from the step-time model (the engine sizes them; the
/// scheduler only counts tokens).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepCaps {
    /// At most this many prompt tokens beside the step's decodes, so the decoding sequences'
    /// next token is not late. Without decodes nothing waits on the step and it does not apply.
    pub prefill: Option<usize>,
    /// Batch prompt tokens only while the step holds fewer prompt tokens than this, decodes or
    /// not: while interactive requests may arrive, a step spent on batch prompts stays about as
    /// short as an interactive decode's, since a request arriving mid-step waits for its end.
    pub batch: Option<usize>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SchedulerStats {
    pub preemptions: u64,
    /// Steps whose prompt tokens filled a cap (`schedule_within`).
    pub capped_steps: u64,
    /// Steps in which batch decodes sat out for an interactive prompt.
    pub batch_sit_outs: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

pub struct Scheduler<P> {
    cfg: SchedulerConfig,
    alloc: SharedAllocator,
    /// Running sequences in admission order (oldest first).
    running: Vec<Entry<P>>,
    // Tenant-keyed maps hash with FxHash: tenant names are set by admins, never by clients,
    // and are hashed several times a step.
    waiting: FxHashMap<Arc<str>, VecDeque<Entry<P>>>,
    /// Tokens scheduled per tenant, for fair admission.
    served: FxHashMap<Arc<str>, u64>,
    next_arrival: u64,
    /// Steps planned so far: the scheduler's clock.
    steps: u64,
    /// Steps running in which batch decodes sat out (at most [`BATCH_SIT_OUT_RUN`]).
    batch_sat_out: u32,
    /// The batch phase of a step under [`StepCaps::batch`] is being planned: a preempted
    /// sequence's tokens go back to the budget only as far as the batch cap allows.
    batch_cap_in_force: bool,
    /// The step's batch cap while it is planned (see [`StepCaps::batch`]).
    batch_cap: Option<usize>,
    pub stats: SchedulerStats,
}

impl<P> Scheduler<P> {
    pub fn new(cfg: SchedulerConfig, alloc: SharedAllocator) -> Self {
        assert!(cfg.max_num_seqs > 0 && cfg.max_batch_tokens > 0);
        Scheduler {
            cfg,
            alloc,
            running: Vec::new(),
            waiting: FxHashMap::default(),
            served: FxHashMap::default(),
            next_arrival: 0,
            steps: 0,
            batch_sat_out: 0,
            batch_cap_in_force: false,
            batch_cap: None,
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn allocator(&self) -> &SharedAllocator {
        &self.alloc
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// Slots of in-use blocks that hold no token yet. Only full blocks are ever shared, so
    /// every empty slot sits in one sequence's own last blocks and is counted once.
    pub fn unfilled_slots(&self) -> usize {
        self.running
            .iter()
            .chain(self.waiting.values().flatten())
            .map(|e| (e.table.len() * BLOCK_TOKENS).saturating_sub(e.computed))
            .sum()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.num_waiting() == 0
    }

    /// Queues a new sequence: in its tenant's queue after every sequence of higher priority
    /// or of the same priority and an earlier (or equal) deadline.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        id: SeqId,
        tenant: Arc<str>,
        urgency: Urgency,
        prompt: Vec<u32>,
        max_len: usize,
        cacheable: bool,
        payload: P,
    ) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let e = Entry {
            id,
            tenant: tenant.clone(),
            urgency,
            queued_at: self.steps,
            preempted_in: None,
            tokens: prompt,
            computed: 0,
            max_len,
            table: BlockTable::new(self.alloc.clone()),
            cacheable,
            registered: 0,
            hashed: (0, 0),
            arrival,
            payload,
        };
        // A tenant that was idle (it has no entry: idle tenants are pruned) starts level with the
        // least-served active tenant: no banked credit, no lasting debt.
        if !self.served.contains_key(&tenant) {
            let floor = self.served.values().copied().min().unwrap_or(0);
            self.served.insert(tenant.clone(), floor);
        }
        let queue = self.waiting.entry(tenant).or_default();
        let key = |w: &Entry<P>| (-w.urgency.priority, w.urgency.deadline);
        // A linear scan, not a binary search: preempted sequences go back to the front whatever
        // their key, so the queue is sorted only after them.
        let at = queue
            .iter()
            .rposition(|w| key(w) <= key(&e))
            .map_or(0, |i| i + 1);
        queue.insert(at, e);
    }

    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Entry<P>> {
        self.running.iter_mut().find(|e| e.id == id)
    }

    /// Removes a running sequence (finished, failed or cancelled); its blocks go back to the pool.
    pub fn remove(&mut self, id: SeqId) -> Option<Entry<P>> {
        let i = self.running.iter().position(|e| e.id == id)?;
        Some(self.running.remove(i))
    }

    /// Removes every sequence, running and waiting, for which `f` says so.
    pub fn drain_where(&mut self, mut f: impl FnMut(&Entry<P>) -> bool) -> Vec<Entry<P>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if f(&self.running[i]) {
                out.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        for q in self.waiting.values_mut() {
            let mut keep = VecDeque::with_capacity(q.len());
            for e in q.drain(..) {
                if f(&e) {
                    out.push(e);
                } else {
                    keep.push_back(e);
                }
            }
            *q = keep;
        }
        out
    }

    /// What the next step's decodes will cost, before it is planned: the sequences ready to
    /// decode and the positions they attend to; where the next prefill chunk would start (the
    /// oldest running sequence with prompt left, else a new one's 0); and the tightest
    /// inter-token target among the decodes (`None`: no decode is owed a short step).
    pub fn decode_shape(&self) -> (StepShape, usize, Option<Duration>) {
        let mut shape = StepShape::default();
        let mut start = None;
        let mut owed: Option<Duration> = None;
        let sit_out = self.batch_sits_out();
        for e in &self.running {
            match e.tokens.len() - e.computed {
                1 if sit_out && e.urgency.class == SloClass::Batch => {}
                1 => {
                    shape.decode_seqs += 1;
                    shape.kv_tokens += e.computed + 1;
                    if let Some(t) = e.urgency.itl_target {
                        owed = Some(owed.map_or(t, |o| o.min(t)));
                    }
                }
                0 => {}
                _ => {
                    start.get_or_insert(e.computed);
                }
            }
        }
        (shape, start.unwrap_or(0), owed)
    }

    /// Whether the next step could hold prompt tokens: a request waits for admission, or a
    /// running sequence has prompt left. Without, step caps (which only bound prompt tokens)
    /// change nothing.
    pub fn has_prompt_work(&self) -> bool {
        self.num_waiting() > 0 || self.running.iter().any(|e| e.tokens.len() - e.computed > 1)
    }

    /// Plans the next step. Chunk tokens are marked computed at once (the step writes them).
    pub fn schedule(&mut self) -> Vec<Planned> {
        self.schedule_within(StepCaps::default())
    }

    /// [`schedule`](Self::schedule), within `caps` (see [`StepCaps`]); never fewer than
    /// [`MIN_PREFILL_CHUNK`] prompt tokens under either cap: prompts always advance.
    pub fn schedule_within(&mut self, caps: StepCaps) -> Vec<Planned> {
        let prefill_cap = caps.prefill;
        let sit_out = self.batch_sits_out();
        self.batch_sat_out = if sit_out { self.batch_sat_out + 1 } else { 0 };
        self.stats.batch_sit_outs += u64::from(sit_out);
        self.steps += 1;
        // Forget tenants with nothing waiting or running, so client-chosen tenant names cannot
        // grow these maps (or the scans over them) without bound.
        self.waiting.retain(|_, q| !q.is_empty());
        let (waiting, running) = (&self.waiting, &self.running);
        self.served
            .retain(|t, _| waiting.contains_key(t) || running.iter().any(|e| &e.tenant == t));
        let mut plan: Vec<Planned> = Vec::new();
        let mut budget = self.cfg.max_batch_tokens;
        // Whether a client waits on this step for a token (what `decode_shape` predicts): a
        // decode preempted below for blocks may be readmitted from its cached prefix and sample
        // in this same step, so the prefill cap holds whether or not one is planned here.
        let decoding = self.running.iter().any(|e| {
            e.tokens.len() - e.computed == 1 && !(sit_out && e.urgency.class == SloClass::Batch)
        });
        // 1. Decodes (one token each), oldest first; preempt the newest when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let e = &self.running[i];
            if e.tokens.len() - e.computed != 1 || (sit_out && e.urgency.class == SloClass::Batch) {
                i += 1;
                continue;
            }
            let want = self.running[i].computed + 1;
            if !self.running[i].table.ensure(want) {
                if self.reclaim_waiting() {
                    continue;
                }
                let victim = self.victim(i);
                if victim == i && i == 0 {
                    // Alone and still short: cannot happen (admission checks the pool), but never spin.
                    break;
                }
                self.preempt(victim);
                continue; // retry `i` (or stop if it was the victim)
            }
            let e = &mut self.running[i];
            plan.push(Planned {
                id: e.id,
                start: e.computed,
                len: 1,
                samples: true,
            });
            e.computed += 1;
            budget -= 1;
            i += 1;
        }
        let capped = match prefill_cap {
            Some(cap) if decoding && cap.max(MIN_PREFILL_CHUNK) < budget => {
                budget = cap.max(MIN_PREFILL_CHUNK);
                true
            }
            _ => false,
        };
        // 2. Prefill chunks of running sequences, oldest first, interactive ones first; then
        //    admission. If the oldest cannot get a single block, the newest is preempted (even
        //    if it was planned above), so it always advances. While others wait for a slot, a
        //    quarter of the budget (of the capped budget, when capped) is kept for admitting
        //    them, so a long prompt never holds a short request's first token hostage.
        //    Interactive requests are admitted before batch prompts are prefilled (taking a
        //    batch sequence's slot if every slot is taken), so a flood of batch prompts never
        //    holds their first token back.
        let quarter = if capped {
            budget
        } else {
            self.cfg.max_batch_tokens
        } / 4;
        self.batch_cap = caps.batch;
        self.prefill_running(SloClass::Interactive, &mut plan, &mut budget, quarter);
        self.admit(true, &mut plan, &mut budget);
        // 3. Batch prompts, within the batch cap counting the prompt tokens already planned.
        let mut batch_capped = false;
        if let Some(cap) = caps.batch {
            let batch = self.batch_room(cap, &plan);
            if batch < budget {
                budget = batch;
                batch_capped = true;
            }
        }
        let quarter = if batch_capped { budget / 4 } else { quarter };
        self.batch_cap_in_force = caps.batch.is_some();
        self.prefill_running(SloClass::Batch, &mut plan, &mut budget, quarter);
        self.admit(false, &mut plan, &mut budget);
        self.batch_cap_in_force = false;
        self.batch_cap = None;
        if (capped || batch_capped) && budget == 0 {
            self.stats.capped_steps += 1;
        }
        self.count_served(&plan);
        // Checked in release builds too: a step past its budget would break every bound above.
        assert!(plan.iter().map(|p| p.len).sum::<usize>() <= self.cfg.max_batch_tokens);
        assert!(plan.len() <= self.cfg.max_num_seqs);
        plan
    }

    /// Adds each planned token to its tenant's served count. The plan mostly follows the
    /// running order (decodes, then prompt chunks, then admissions at the end), so each entry
    /// is looked for from the last one's place, and a tenant's count is updated once per run
    /// of its entries: a step of hundreds of sequences costs a pass, not a search per entry.
    fn count_served(&mut self, plan: &[Planned]) {
        let mut at = 0;
        let mut run: Option<(Arc<str>, u64)> = None;
        for p in plan {
            let found = (at..self.running.len())
                .chain(0..at)
                .find(|&j| self.running[j].id == p.id);
            let Some(j) = found else {
                continue;
            };
            at = j + 1;
            let tenant = &self.running[j].tenant;
            match &mut run {
                Some((t, n)) if t == tenant => *n += p.len as u64,
                _ => {
                    if let Some((t, n)) = run.replace((tenant.clone(), p.len as u64)) {
                        *self.served.entry(t).or_insert(0) += n;
                    }
                }
            }
        }
        if let Some((t, n)) = run {
            *self.served.entry(t).or_insert(0) += n;
        }
    }

    /// Gives running sequences of `class` their next prompt chunks, oldest first, keeping
    /// `quarter` of the budget back while others wait for a slot.
    fn prefill_running(
        &mut self,
        class: SloClass,
        plan: &mut Vec<Planned>,
        budget: &mut usize,
        quarter: usize,
    ) {
        let admitting = self.num_waiting() > 0 && self.running.len() < self.cfg.max_num_seqs;
        let reserve = if admitting {
            quarter.min(budget.saturating_sub(1))
        } else {
            0
        };
        let mut i = 0;
        while i < self.running.len() && *budget > reserve {
            if self.running[i].urgency.class != class {
                i += 1;
                continue;
            }
            let left = self.running[i].tokens.len() - self.running[i].computed;
            // A sequence with one token left decodes in step 1, or is sitting this step out.
            if left <= 1 {
                i += 1;
                continue;
            }
            let n = Self::fit_chunk(&mut self.running[i], left.min(*budget - reserve));
            if n == 0 {
                if self.reclaim_waiting() {
                    continue;
                }
                let victim = self.victim(i);
                if i == 0 && victim > 0 {
                    self.unplan(victim, plan, budget);
                    self.preempt(victim);
                    continue;
                }
                i += 1;
                continue;
            }
            let e = &mut self.running[i];
            plan.push(Planned {
                id: e.id,
                start: e.computed,
                len: n,
                samples: e.computed + n == e.tokens.len(),
            });
            e.computed += n;
            *budget -= n;
            i += 1;
        }
    }

    /// Admits waiting sequences fairly while there is room, and gives them a first chunk;
    /// with `urgent_only`, only while the next to admit is interactive (or a batch one past
    /// its patience). A request finding every slot taken may take one (`make_room`).
    fn admit(&mut self, urgent_only: bool, plan: &mut Vec<Planned>, budget: &mut usize) {
        while *budget > 0 {
            let Some(tenant) = self.next_tenant() else {
                break;
            };
            if urgent_only
                && self
                    .waiting
                    .get(&tenant)
                    .and_then(|q| q.front())
                    .is_some_and(|e| self.deferred(e))
            {
                break;
            }
            if self.running.len() >= self.cfg.max_num_seqs && !self.make_room(&tenant, plan, budget)
            {
                break;
            }
            let Some(mut e) = self.waiting.get_mut(&tenant).and_then(VecDeque::pop_front) else {
                break;
            };
            // Preempted to free blocks in this step: taking them back at once (its blocks are
            // still in the prefix cache) would undo that, and run a decode the step's plan
            // (`decode_shape`) left out. Next step.
            if e.preempted_in == Some(self.steps) {
                self.waiting.entry(tenant).or_default().push_front(e);
                break;
            }
            // A batch sequence admitted with interactive ones (its patience ran out) still
            // counts against the batch cap.
            let room = match (e.urgency.class, self.batch_cap) {
                (SloClass::Batch, Some(cap)) => self.batch_room(cap, plan),
                _ => usize::MAX,
            };
            if room == 0 {
                self.waiting.entry(tenant).or_default().push_front(e);
                break;
            }
            let (queried, hit) = self.reuse_prefix(&mut e);
            let left = e.tokens.len() - e.computed;
            let n = Self::fit_chunk(&mut e, left.min(*budget).min(room));
            if n == 0 {
                // The pool cannot hold even a first chunk now: put it back. Waiting sequences
                // may be what holds the pool (forked choices keep their leader's prompt
                // blocks): release theirs and try again, or with nothing running, nothing
                // would ever free a block (found by the liveness property).
                e.table.clear();
                e.computed = 0;
                e.registered = 0;
                self.waiting.entry(tenant).or_default().push_front(e);
                if self.reclaim_waiting() {
                    continue;
                }
                break;
            }
            // Counted only now: a retried admission must not count its lookups twice.
            self.stats.prefix_queries += queried as u64;
            self.stats.prefix_hits += hit as u64;
            plan.push(Planned {
                id: e.id,
                start: e.computed,
                len: n,
                samples: e.computed + n == e.tokens.len(),
            });
            e.computed += n;
            *budget -= n;
            self.running.push(e);
        }
    }

    /// Registers blocks that the last step filled, so later sequences can reuse them.
    pub fn after_step(&mut self) {
        for e in self.running.iter_mut().filter(|e| e.cacheable) {
            let full = e.computed / BLOCK_TOKENS;
            if full > e.registered {
                // Continue the chain where it was left when that is at or before the first
                // block to register (rehashing a long context from its start every 16 tokens
                // was a fifth of the fleet simulator's time); from the start otherwise.
                let (mut b, mut h) = if e.hashed.0 <= e.registered {
                    e.hashed
                } else {
                    (0, 0)
                };
                while b < full {
                    h = block_hash(h, &e.tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS]);
                    if b >= e.registered {
                        e.table.register(b, h);
                    }
                    b += 1;
                }
                e.hashed = (full, h);
                e.registered = full;
            }
        }
    }

    /// Starts sequence `id` from running sequence `from`'s tokens (call it when `from` has
    /// computed them, before its next token is pushed): `id` shares `from`'s full blocks
    /// below the last token and goes first in its tenant's queue to compute the rest, so the
    /// choices of one prompt (`n > 1`) compute it once. Only full blocks are shared, and `id`
    /// writes only past them. Without `from` (gone meanwhile), `payload` is dropped.
    pub fn fork(&mut self, from: SeqId, id: SeqId, max_len: usize, payload: P) {
        let Some(src) = self.running.iter().find(|e| e.id == from) else {
            return;
        };
        let tokens = src.tokens.clone();
        let shared = ((tokens.len().max(1) - 1) / BLOCK_TOKENS)
            .min(src.computed / BLOCK_TOKENS)
            .min(src.table.len());
        let e = Entry {
            id,
            tenant: src.tenant.clone(),
            urgency: src.urgency,
            queued_at: self.steps,
            preempted_in: None,
            computed: shared * BLOCK_TOKENS,
            max_len: max_len.max(tokens.len()),
            tokens,
            table: src.table.share(shared),
            cacheable: src.cacheable,
            registered: src.registered.min(shared),
            hashed: (0, 0),
            arrival: src.arrival,
            payload,
        };
        let queue = self.waiting.entry(e.tenant.clone()).or_default();
        // After the choices forked from `from` already waiting, ahead of everything else.
        let at = queue.iter().take_while(|w| w.arrival == e.arrival).count();
        queue.insert(at, e);
    }

    /// Appends a sampled token to a running sequence.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(e) = self.get_mut(id) {
            debug_assert!(e.tokens.len() < e.max_len);
            e.tokens.push(token);
        }
    }

    /// Shrinks a chunk to what the pool can back; allocates its blocks.
    fn fit_chunk(e: &mut Entry<P>, want: usize) -> usize {
        let mut n = want;
        while n > 0 && !e.table.ensure(e.computed + n) {
            // Whole blocks at a time: what the current table already covers, then one block less.
            let covered = e.table.len() * BLOCK_TOKENS;
            n = if covered > e.computed && covered - e.computed < n {
                covered - e.computed
            } else {
                n.saturating_sub(BLOCK_TOKENS)
            };
        }
        n
    }

    /// Looks up the sequence's full blocks (all but its last token) in the prefix cache; returns
    /// the tokens looked up and the tokens found.
    fn reuse_prefix(&mut self, e: &mut Entry<P>) -> (usize, usize) {
        if !e.cacheable || e.computed > 0 || e.tokens.len() < 2 {
            return (0, 0);
        }
        let full = (e.tokens.len() - 1) / BLOCK_TOKENS;
        let mut h = 0;
        let hashes: Vec<u64> = (0..full)
            .map(|b| {
                h = block_hash(h, &e.tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS]);
                h
            })
            .collect();
        let hit = e.table.adopt_cached(&hashes);
        e.computed = hit * BLOCK_TOKENS;
        e.registered = hit;
        e.hashed = hit
            .checked_sub(1)
            .and_then(|i| hashes.get(i))
            .map_or((0, 0), |&h| (hit, h));
        (full * BLOCK_TOKENS, hit * BLOCK_TOKENS)
    }

    /// Releases the blocks that waiting sequences hold (forked choices keep their leader's
    /// prompt blocks while they wait): running sequences come first, and a waiting one that
    /// held blocks finds them again in the prefix cache or recomputes. True if any were held.
    fn reclaim_waiting(&mut self) -> bool {
        let mut any = false;
        for e in self.waiting.values_mut().flatten() {
            if !e.table.is_empty() {
                e.table.clear();
                e.computed = 0;
                e.registered = 0;
                any = true;
            }
        }
        any
    }

    /// Frees a slot, when every slot is taken, for the front request of `tenant`'s queue: an
    /// interactive request takes the newest running batch sequence's; failing that, it takes
    /// the newest sequence of the tenant holding the most slots if that tenant holds at least
    /// two more than `tenant` (a batch request only a batch sequence's): slots tend to an even
    /// split between the tenants with work, however many one of them sends, and never swing
    /// back (the taker still holds fewer). The preempted sequence goes back to its queue and
    /// is recomputed later; never the oldest running, and out of this step's plan if it was in
    /// it. False when nothing may yield.
    fn make_room(
        &mut self,
        tenant: &Arc<str>,
        plan: &mut Vec<Planned>,
        budget: &mut usize,
    ) -> bool {
        let Some(class) = self
            .waiting
            .get(tenant)
            .and_then(|q| q.front())
            .map(|e| e.urgency.class)
        else {
            return false;
        };
        let newest = |s: &Self, f: &dyn Fn(&Entry<P>) -> bool| {
            (1..s.running.len()).rev().find(|&j| f(&s.running[j]))
        };
        let mut victim = None;
        if class == SloClass::Interactive {
            victim = newest(self, &|e| e.urgency.class == SloClass::Batch);
        }
        if victim.is_none() {
            let mut held: FxHashMap<&Arc<str>, usize> = FxHashMap::default();
            for e in &self.running {
                *held.entry(&e.tenant).or_insert(0) += 1;
            }
            let mine = held.get(tenant).copied().unwrap_or(0);
            if let Some((most, n)) = held.into_iter().max_by_key(|&(t, n)| (n, t.clone())) {
                let most = most.clone();
                if n >= mine + 2 {
                    victim = newest(self, &|e| {
                        e.tenant == most
                            && (class == SloClass::Interactive || e.urgency.class == class)
                    });
                }
            }
        }
        let Some(victim) = victim else {
            return false;
        };
        self.unplan(victim, plan, budget);
        self.preempt(victim);
        true
    }

    /// Takes running sequence `i`'s part out of the step being planned (it is about to be
    /// preempted); its tokens go back to the budget, in the batch phase under a batch cap only
    /// up to the batch room that is left without it.
    fn unplan(&self, i: usize, plan: &mut Vec<Planned>, budget: &mut usize) {
        let id = self.running[i].id;
        if let Some(at) = plan.iter().position(|p| p.id == id) {
            *budget += plan.remove(at).len;
            if let (true, Some(cap)) = (self.batch_cap_in_force, self.batch_cap) {
                *budget = (*budget).min(self.batch_room(cap, plan));
            }
        }
    }

    /// The sequence to preempt when the one at `i` needs a block: the newest batch sequence
    /// after it; else `i` itself if it is batch (and not the oldest, which always advances);
    /// else the newest of all. Never one before `i`: the caller keeps their places.
    fn victim(&self, i: usize) -> usize {
        let last = self.running.len() - 1;
        let batch = |j: usize| self.running[j].urgency.class == SloClass::Batch;
        (i + 1..=last)
            .rev()
            .find(|&j| batch(j))
            .unwrap_or(if i > 0 && batch(i) { i } else { last })
    }

    fn preempt(&mut self, i: usize) {
        let mut e = self.running.remove(i);
        e.preempted_in = Some(self.steps);
        e.table.clear();
        e.computed = 0;
        e.registered = 0;
        self.stats.preemptions += 1;
        // Back to the front of its tenant's queue: it is older than anything waiting there.
        self.waiting
            .entry(e.tenant.clone())
            .or_default()
            .push_front(e);
    }

    /// Whether batch decodes sit out the next step: when an interactive prompt waits to be
    /// prefilled (running, or waiting to be admitted), the step's time goes to it rather than
    /// to a token of each batch sequence; at most [`BATCH_SIT_OUT_RUN`] steps running (a short
    /// prompt's prefill, in the capped pieces a busy server gives it), so batch sequences keep
    /// at least a quarter of their decode pace whatever the interactive load.
    fn batch_sits_out(&self) -> bool {
        if self.batch_sat_out >= BATCH_SIT_OUT_RUN {
            return false;
        }
        let left = |e: &Entry<P>| e.tokens.len() - e.computed;
        let batch_decodes = self
            .running
            .iter()
            .any(|e| e.urgency.class == SloClass::Batch && left(e) == 1);
        batch_decodes
            && (self
                .running
                .iter()
                .any(|e| e.urgency.class == SloClass::Interactive && left(e) > 1)
                || self
                    .waiting
                    .values()
                    .filter_map(VecDeque::front)
                    .any(|e| e.urgency.class == SloClass::Interactive))
    }

    /// Batch prompt tokens the step may still take under the batch cap `cap`: the cap less
    /// the step's other prompt tokens, at least [`MIN_PREFILL_CHUNK`], less the batch prompt
    /// tokens already planned (so the floor is granted once a step, not once a phase).
    fn batch_room(&self, cap: usize, plan: &[Planned]) -> usize {
        let mut prompt = [0usize; 2];
        for p in plan.iter().filter(|p| p.len > 1) {
            let batch = self
                .running
                .iter()
                .find(|e| e.id == p.id)
                .is_some_and(|e| e.urgency.class == SloClass::Batch);
            prompt[usize::from(batch)] += p.len;
        }
        cap.saturating_sub(prompt[0])
            .max(MIN_PREFILL_CHUNK)
            .saturating_sub(prompt[1])
    }

    /// A batch sequence still within its patience: admitted after interactive ones.
    fn deferred(&self, e: &Entry<P>) -> bool {
        e.urgency.class == SloClass::Batch
            && self.steps.saturating_sub(e.queued_at) < BATCH_PATIENCE_STEPS
    }

    /// The tenant to admit from: interactive before batch (a batch sequence waiting past its
    /// patience counts as interactive), then highest waiting priority, then least served, then
    /// fewest running sequences, then earliest deadline, then oldest.
    fn next_tenant(&self) -> Option<Arc<str>> {
        let running = |t: &Arc<str>| self.running.iter().filter(|e| &e.tenant == t).count();
        self.waiting
            .iter()
            .filter_map(|(t, q)| q.front().map(|e| (t, e)))
            .min_by_key(|(t, e)| {
                (
                    self.deferred(e),
                    -e.urgency.priority,
                    self.served.get(*t).copied().unwrap_or(0),
                    running(t),
                    e.urgency.deadline,
                    e.arrival,
                )
            })
            .map(|(t, _)| t.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Priority 0, deadlines all equal (first come, first served within a tenant).
    fn urgent(class: SloClass) -> Urgency {
        Urgency {
            class,
            ..Urgency::default()
        }
    }

    /// Drives the scheduler like the engine does, with a fake model: every sampled token is
    /// `7`, and a sequence finishes after `gen` tokens. Every step is planned within `caps`,
    /// as the engine caps steps for decodes' latency and while interactive requests are about.
    fn run(
        cfg: SchedulerConfig,
        pool_blocks: usize,
        reqs: Vec<(usize, usize, u8, usize)>,
        caps: StepCaps,
    ) -> Result<(), TestCaseError> {
        let cap = caps.prefill;
        let alloc = SharedAllocator::new(pool_blocks);
        let mut s: Scheduler<usize> = Scheduler::new(cfg, alloc.clone());
        let total: usize = reqs.iter().map(|r| 1 + r.3).sum();
        let mut pending: VecDeque<_> = reqs.into_iter().enumerate().collect();
        let mut finished = 0;
        // Sequences that start `n` choices from their prompt once it is computed.
        let mut to_fork: HashMap<u64, usize> = HashMap::new();
        let mut next_id = 1_000_000;
        let mut steps = 0;
        while finished < total {
            steps += 1;
            prop_assert!(
                steps < 20_000,
                "no progress: {} running, {} waiting",
                s.num_running(),
                s.num_waiting()
            );
            // Arrivals: up to two per step.
            for _ in 0..2 {
                if let Some((id, (prompt, gen, tenant, forks))) = pending.pop_front() {
                    if forks > 0 {
                        to_fork.insert(id as u64, forks);
                    }
                    let toks: Vec<u32> = (0..prompt as u32).map(|t| t % 5).collect();
                    // Tenant 2 is a batch tenant: batch is deferred, never starved.
                    let class = match tenant {
                        2 => SloClass::Batch,
                        _ => SloClass::Interactive,
                    };
                    s.add(
                        id as u64,
                        Arc::from(format!("t{tenant}")),
                        urgent(class),
                        toks,
                        prompt + gen,
                        true,
                        gen,
                    );
                }
            }
            let (decode, ..) = s.decode_shape();
            let ready: Vec<u64> = s
                .running
                .iter()
                .filter(|e| e.tokens.len() - e.computed == 1)
                .map(|e| e.id)
                .collect();
            let plan = s.schedule_within(caps);
            let tokens = plan.iter().map(|p| p.len).sum::<usize>();
            prop_assert!(tokens <= cfg.max_batch_tokens);
            // The decodes the step holds (some predicted may have been preempted for blocks,
            // and with none left nothing waits on the step, so nothing caps it). A sequence
            // preempted and readmitted in the same step recomputes from its start: a one-token
            // chunk of that samples nothing and is not a decode.
            let decodes = plan
                .iter()
                .filter(|p| p.len == 1 && p.samples && ready.contains(&p.id))
                .count();
            prop_assert!(decodes <= decode.decode_seqs);
            if let (Some(c), true) = (cap, decodes > 0) {
                // Beside decodes, no more prompt tokens than the cap (or the floor); a decode
                // preempted after the cap was set gives its one token back to the step.
                prop_assert!(tokens <= decode.decode_seqs + c.max(MIN_PREFILL_CHUNK));
            }
            if let Some(c) = caps.batch {
                // Batch prompt tokens only up to the cap, counting the step's other prompt
                // tokens (or the floor).
                let mut prompt = [0, 0];
                for p in plan.iter().filter(|p| p.len > 1) {
                    let class = s.get_mut(p.id).unwrap().urgency.class;
                    prompt[usize::from(class == SloClass::Batch)] += p.len;
                }
                prop_assert!(prompt[1] <= c.saturating_sub(prompt[0]).max(MIN_PREFILL_CHUNK));
            }
            prop_assert!(plan.len() <= cfg.max_num_seqs);
            prop_assert!(s.num_running() <= cfg.max_num_seqs);
            let mut ids: Vec<_> = plan.iter().map(|p| p.id).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), plan.len(), "a sequence twice in one step");
            for p in &plan {
                let e = s.get_mut(p.id).unwrap();
                prop_assert!(
                    e.table.len() * BLOCK_TOKENS >= p.start + p.len,
                    "chunk not backed by blocks"
                );
            }
            s.after_step();
            // Paging wastes less than a block per sequence: only its last block is partial.
            let seqs = s.num_running() + s.num_waiting();
            prop_assert!(s.unfilled_slots() <= (BLOCK_TOKENS - 1) * seqs);
            for p in plan.iter().filter(|p| p.samples) {
                for _ in 0..to_fork.remove(&p.id).unwrap_or(0) {
                    let e = s.get_mut(p.id).unwrap();
                    let (max_len, gen) = (e.max_len, e.payload);
                    s.fork(p.id, next_id, max_len, gen);
                    next_id += 1;
                }
                let e = s.get_mut(p.id).unwrap();
                let generated = e.tokens.len() + 1 - (e.max_len - e.payload);
                if generated >= e.payload {
                    s.remove(p.id);
                    finished += 1;
                } else {
                    s.push_token(p.id, 7);
                }
            }
            alloc.lock().check_invariants();
        }
        prop_assert!(s.is_idle());
        let a = alloc.lock();
        prop_assert_eq!(a.used(), 0, "everything is free at the end");
        Ok(())
    }

    proptest! {
        /// A step never exceeds the token budget or the sequence cap, and every admitted
        /// sequence finishes (liveness), under random arrivals and lengths with a small pool,
        /// some of them forking choices (`n > 1`) from their prompt.
        #[test]
        fn budget_cap_and_liveness(
            max_num_seqs in 1usize..6,
            max_batch_tokens in 1usize..64,
            reqs in proptest::collection::vec((1usize..70, 1usize..40, 0u8..3, 0usize..3), 1..14),
            cap in proptest::option::of(0usize..40),
            batch_cap in proptest::option::of(0usize..40),
        ) {
            // Pool big enough for the largest single request (as submission guarantees), small
            // enough that concurrent ones must preempt. Under a cap, liveness holds too: the
            // floor keeps prompts moving however many sequences decode.
            let need = reqs.iter().map(|(p, g, ..)| (p + g).div_ceil(BLOCK_TOKENS)).max().unwrap();
            let caps = StepCaps { prefill: cap, batch: batch_cap };
            run(SchedulerConfig { max_num_seqs, max_batch_tokens }, need + 1, reqs, caps)?;
        }
    }

    /// Queues sequence `id` of `tenant`: a prompt of `prompt` tokens (all `1`), at most
    /// `max_len` tokens in all, default urgency of `class`.
    fn add(
        s: &mut Scheduler<()>,
        id: SeqId,
        tenant: &str,
        class: SloClass,
        prompt: usize,
        max_len: usize,
    ) {
        s.add(
            id,
            Arc::from(tenant),
            urgent(class),
            vec![1; prompt],
            max_len,
            true,
            (),
        );
    }

    #[test]
    fn long_prefill_is_chunked_and_decodes_keep_running() {
        let alloc = SharedAllocator::new(64);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 32,
            },
            alloc,
        );
        add(&mut s, 1, "a", SloClass::Interactive, 4, 100);
        let p = s.schedule();
        assert_eq!(
            p,
            vec![Planned {
                id: 1,
                start: 0,
                len: 4,
                samples: true
            }]
        );
        s.push_token(1, 9);
        s.add(
            2,
            Arc::from("a"),
            urgent(SloClass::Interactive),
            vec![2; 300],
            400,
            true,
            (),
        );
        for _ in 0..5 {
            let p = s.schedule();
            assert_eq!(
                p[0],
                Planned {
                    id: 1,
                    start: p[0].start,
                    len: 1,
                    samples: true
                },
                "the decode goes first every step"
            );
            assert_eq!(
                p[1].len, 31,
                "with nobody waiting, the prompt gets the rest of the budget"
            );
            s.push_token(1, 9);
        }
    }

    #[test]
    fn a_long_prefill_leaves_room_to_admit_a_waiting_request() {
        let alloc = SharedAllocator::new(64);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 64,
            },
            alloc,
        );
        s.add(
            1,
            Arc::from("a"),
            urgent(SloClass::Interactive),
            vec![2; 600],
            700,
            true,
            (),
        );
        assert_eq!(s.schedule()[0].len, 64);
        s.add(
            2,
            Arc::from("b"),
            urgent(SloClass::Interactive),
            vec![3; 5],
            10,
            true,
            (),
        );
        let p = s.schedule();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].id, p[0].len), (1, 48));
        assert_eq!((p[1].id, p[1].len), (2, 5));
    }

    #[test]
    fn an_idle_tenant_does_not_bank_credit() {
        let alloc = SharedAllocator::new(64);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 1,
                max_batch_tokens: 64,
            },
            alloc,
        );
        // "early" is served a little, then goes idle; "busy" is served a lot.
        add(&mut s, 1, "early", SloClass::Interactive, 4, 8);
        s.schedule();
        s.remove(1);
        for i in 0..6 {
            s.add(
                10 + i,
                Arc::from("busy"),
                urgent(SloClass::Interactive),
                vec![1; 40],
                48,
                true,
                (),
            );
        }
        for _ in 0..5 {
            let p = s.schedule();
            s.remove(p[0].id);
        }
        assert!(
            !s.served.contains_key("early"),
            "idle tenants are forgotten"
        );
        let busy = s.served["busy"];
        assert!(busy >= 200);
        // "early" rejoins level with "busy" (which still has work queued), not ~200 tokens ahead.
        add(&mut s, 21, "early", SloClass::Interactive, 4, 8);
        assert_eq!(s.served["early"], busy);
    }

    #[test]
    fn shared_prefix_is_reused() {
        let alloc = SharedAllocator::new(64);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 512,
            },
            alloc,
        );
        let prompt: Vec<u32> = (0..40).collect();
        s.add(
            1,
            Arc::from("a"),
            urgent(SloClass::Interactive),
            prompt.clone(),
            50,
            true,
            (),
        );
        s.schedule();
        s.after_step();
        let mut other = prompt.clone();
        other[39] = 999;
        s.add(
            2,
            Arc::from("b"),
            urgent(SloClass::Interactive),
            other,
            50,
            true,
            (),
        );
        let p = s.schedule();
        let second = p.iter().find(|p| p.id == 2).unwrap();
        assert_eq!(
            (second.start, second.len),
            (32, 8),
            "two full blocks come from the cache"
        );
        assert_eq!((s.stats.prefix_queries, s.stats.prefix_hits), (64, 32));
    }

    /// Blocks registered a few at a time as a sequence decodes (the hash chain continued from
    /// where the last step left it) are the blocks a new prompt of the same tokens finds.
    #[test]
    fn blocks_filled_by_decoding_are_found_by_a_later_prompt() {
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 512,
            },
            SharedAllocator::new(64),
        );
        let mut tokens: Vec<u32> = (0..20).collect();
        let urgency = urgent(SloClass::Interactive);
        s.add(1, Arc::from("a"), urgency, tokens.clone(), 200, true, ());
        for t in 0..60u32 {
            assert_eq!(s.schedule().len(), 1);
            s.after_step();
            s.push_token(1, 1000 + t);
            tokens.push(1000 + t);
        }
        // 80 tokens, 79 computed: four full blocks registered over the steps.
        s.add(
            2,
            Arc::from("b"),
            urgency,
            tokens[..70].to_vec(),
            200,
            true,
            (),
        );
        let p = s.schedule();
        let second = p.iter().find(|p| p.id == 2).unwrap();
        assert_eq!(
            (second.start, second.len),
            (64, 6),
            "four blocks from the cache"
        );
    }

    #[test]
    fn forked_choices_share_the_prompt_blocks_and_compute_only_the_tail() {
        let alloc = SharedAllocator::new(64);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 4,
                max_batch_tokens: 512,
            },
            alloc.clone(),
        );
        // Uncacheable (prefix caching off): the fork shares blocks without the cache.
        s.add(
            1,
            Arc::from("a"),
            urgent(SloClass::Interactive),
            (0..40).collect(),
            50,
            false,
            (),
        );
        assert_eq!(s.schedule()[0].len, 40);
        s.after_step();
        s.fork(1, 2, 50, ());
        s.fork(1, 3, 50, ());
        s.push_token(1, 7);
        let used = alloc.lock().used();
        let p = s.schedule();
        let tails: Vec<_> = p
            .iter()
            .filter(|p| p.id != 1)
            .map(|p| (p.id, p.start, p.len))
            .collect();
        assert_eq!(
            tails,
            vec![(2, 32, 8), (3, 32, 8)],
            "in order, from the shared blocks"
        );
        assert!(p.iter().all(|p| p.id == 1 || p.samples));
        // Each choice took one block of its own for the tail; the two full blocks are shared.
        assert_eq!(alloc.lock().used(), used + 2);
        let first = s.running[0].table.blocks()[..2].to_vec();
        for e in &s.running[1..] {
            assert_eq!(&e.table.blocks()[..2], first.as_slice());
            assert_ne!(e.table.blocks()[2], s.running[0].table.blocks()[2]);
        }
        assert_eq!(alloc.lock().refcount(first[0]), 3);
        for id in [1, 2, 3] {
            s.remove(id);
        }
        alloc.lock().check_invariants();
        assert_eq!(alloc.lock().used(), 0);
    }

    #[test]
    fn a_flooding_tenant_does_not_starve_another() {
        let alloc = SharedAllocator::new(256);
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 2,
                max_batch_tokens: 64,
            },
            alloc,
        );
        for i in 0..50 {
            add(&mut s, i, "flood", SloClass::Interactive, 8, 16);
        }
        s.schedule();
        add(&mut s, 100, "quiet", SloClass::Interactive, 8, 16);
        // Free one slot: the quiet tenant, served least, is admitted next despite arriving last.
        let first = s.running[0].id;
        s.remove(first);
        let p = s.schedule();
        assert!(p.iter().any(|p| p.id == 100), "{p:?}");
    }

    fn with_slots(max_num_seqs: usize) -> Scheduler<()> {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs,
                max_batch_tokens: 64,
            },
            SharedAllocator::new(256),
        )
    }

    #[test]
    fn interactive_is_admitted_before_batch_and_batch_within_its_patience() {
        let mut s = with_slots(1);
        add(&mut s, 1, "b", SloClass::Batch, 8, 9);
        add(&mut s, 2, "i", SloClass::Interactive, 8, 9);
        // The batch request came first; the interactive one is admitted first.
        assert_eq!(s.schedule()[0].id, 2);
        s.remove(2);
        assert_eq!(s.schedule()[0].id, 1);
        s.remove(1);

        // An interactive flood defers batch, for at most BATCH_PATIENCE_STEPS steps.
        let mut s = with_slots(1);
        add(&mut s, 1, "b", SloClass::Batch, 8, 9);
        let mut admitted_at = None;
        for (step, next) in (0..2 * BATCH_PATIENCE_STEPS).zip(100..) {
            add(&mut s, next, "i", SloClass::Interactive, 8, 9);
            let p = s.schedule();
            if p.iter().any(|p| p.id == 1) {
                admitted_at = Some(step);
                break;
            }
            // Each interactive request is done in one step, freeing the slot.
            for planned in p {
                s.remove(planned.id);
            }
        }
        let at = admitted_at.expect("batch was starved");
        assert!(
            at + 1 >= BATCH_PATIENCE_STEPS && at <= BATCH_PATIENCE_STEPS + 1,
            "{at}"
        );
    }

    #[test]
    fn batch_is_preempted_before_interactive() {
        // Blocks for three prompts and one more: two of the three decodes find none.
        let mut s: Scheduler<()> = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 3,
                max_batch_tokens: 256,
            },
            SharedAllocator::new(4),
        );
        let prompt = vec![1; BLOCK_TOKENS];
        s.add(
            1,
            Arc::from("i"),
            urgent(SloClass::Interactive),
            prompt.clone(),
            3 * BLOCK_TOKENS,
            true,
            (),
        );
        s.add(
            2,
            Arc::from("b"),
            urgent(SloClass::Batch),
            prompt.clone(),
            3 * BLOCK_TOKENS,
            true,
            (),
        );
        s.add(
            3,
            Arc::from("j"),
            urgent(SloClass::Interactive),
            prompt,
            3 * BLOCK_TOKENS,
            true,
            (),
        );
        let first = s.schedule();
        assert_eq!(first.len(), 3, "{first:?}");
        for id in [1, 2, 3] {
            s.push_token(id, 7);
        }
        // Each decode needs a second block: the batch sequence gives its own back, and the
        // newest (interactive) one decodes with it.
        let p = s.schedule();
        assert!(p.iter().all(|p| p.id != 2), "{p:?}");
        assert!(p.iter().any(|p| p.id == 3), "{p:?}");
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn decodes_are_owed_their_tightest_target() {
        let mut s = with_slots(4);
        let owed = |ms: u64| Urgency {
            itl_target: Some(Duration::from_millis(ms)),
            ..urgent(SloClass::Interactive)
        };
        add(&mut s, 1, "b", SloClass::Batch, 4, 64);
        s.schedule();
        s.push_token(1, 7);
        assert_eq!(s.decode_shape().2, None, "a batch decode is owed nothing");
        s.add(2, Arc::from("i"), owed(100), vec![1; 4], 64, true, ());
        s.add(3, Arc::from("j"), owed(40), vec![1; 4], 64, true, ());
        // Still prefilling: not yet owed anything (and the batch decode sat the step out).
        let p = s.schedule();
        assert_eq!(s.decode_shape().2, None);
        assert!(p.iter().all(|p| p.id != 1), "{p:?}");
        for id in [2, 3] {
            s.push_token(id, 7);
        }
        let (shape, _, owed) = s.decode_shape();
        assert_eq!(owed, Some(Duration::from_millis(40)));
        assert_eq!(shape.decode_seqs, 3);
    }

    #[test]
    fn a_tenants_queue_is_served_by_priority_then_earliest_deadline() {
        let at = |priority: i32, deadline: u64, class: SloClass| {
            let u = Urgency {
                priority,
                class,
                deadline,
                itl_target: None,
            };
            (0, u)
        };
        // One tenant, arrival order 0..=4; a batch request's deadline is far off, so interactive
        // requests arriving after it go before it.
        let order = admission_order(&[
            at(0, 900, SloClass::Batch),
            at(0, 30, SloClass::Interactive),
            at(0, 20, SloClass::Interactive),
            at(1, 50, SloClass::Interactive),
            at(0, 20, SloClass::Interactive),
        ]);
        assert_eq!(order, vec![3, 2, 4, 1, 0]);
    }

    #[test]
    fn batch_prompts_do_not_hold_back_an_interactive_first_token() {
        // Every slot is a batch sequence with prompt left, enough to fill any step's budget
        // (64 tokens); the waiting batch requests keep the slots refilled.
        let mut s = with_slots(4);
        for id in 1..=8 {
            add(&mut s, id, "b", SloClass::Batch, 400, 480);
        }
        while s.num_running() < 4 {
            s.schedule();
        }
        add(&mut s, 20, "i", SloClass::Interactive, 40, 48);
        let p = s.schedule();
        // Admitted at once, with its whole prompt before the batch prompts get the rest.
        let mine = p.iter().find(|p| p.id == 20).copied();
        assert_eq!(mine.map(|p| (p.len, p.samples)), Some((40, true)), "{p:?}");
        assert_eq!(p.iter().map(|p| p.len).sum::<usize>(), 64, "{p:?}");
    }

    #[test]
    fn the_batch_cap_keeps_batch_prompt_steps_short_and_lets_them_advance() {
        let mut s = with_slots(4);
        for id in 1..=4 {
            add(&mut s, id, "b", SloClass::Batch, 400, 480);
        }
        let caps = StepCaps {
            prefill: None,
            batch: Some(24),
        };
        // No decodes, no interactive prompt: batch prompts fill the cap, not the budget (64).
        let p = s.schedule_within(caps);
        assert_eq!(p.iter().map(|p| p.len).sum::<usize>(), 24, "{p:?}");
        // An interactive prompt is not capped by it, and it counts against the cap; batch
        // prompts still advance by the floor.
        add(&mut s, 20, "i", SloClass::Interactive, 40, 48);
        let p = s.schedule_within(caps);
        let mine = p.iter().find(|p| p.id == 20).map(|p| p.len);
        assert_eq!(mine, Some(40), "{p:?}");
        assert_eq!(
            p.iter().map(|p| p.len).sum::<usize>(),
            40 + MIN_PREFILL_CHUNK,
            "{p:?}"
        );
        // Without the cap the step takes its whole budget.
        let p = s.schedule();
        assert_eq!(p.iter().map(|p| p.len).sum::<usize>(), 64, "{p:?}");
    }

    #[test]
    fn batch_decodes_sit_out_for_an_interactive_prompt_at_most_three_steps_running() {
        let mut s = with_slots(4);
        for id in [1, 2] {
            add(&mut s, id, "b", SloClass::Batch, 8, 64);
        }
        s.schedule();
        for id in [1, 2] {
            s.push_token(id, 7);
        }
        // A 300-token interactive prompt takes five 64-token steps.
        add(&mut s, 3, "i", SloClass::Interactive, 300, 356);
        let (shape, ..) = s.decode_shape();
        assert_eq!(shape.decode_seqs, 0, "the batch decodes sit this step out");
        let mut batch_decoded = vec![];
        for _ in 0..6 {
            let p = s.schedule();
            let decoded: Vec<u64> = p.iter().filter(|p| p.len == 1).map(|p| p.id).collect();
            for &id in &decoded {
                s.push_token(id, 7);
            }
            batch_decoded.push(decoded.len());
        }
        // Out three steps, in one, out again until the prompt is in: a quarter of their pace
        // while it is prefilled, never stopped; then every step.
        assert_eq!(batch_decoded, vec![0, 0, 0, 2, 0, 2]);
        assert_eq!(s.stats.batch_sit_outs, 4);
    }

    #[test]
    fn a_tenant_holding_fewer_slots_takes_one_from_the_tenant_holding_most() {
        let mut s = with_slots(3);
        for id in 1..=3 {
            add(&mut s, id, "flood", SloClass::Interactive, 8, 64);
        }
        s.schedule();
        for id in 1..=3 {
            s.push_token(id, 7);
        }
        assert_eq!(s.num_running(), 3);
        // A batch request may not take an interactive sequence's slot.
        add(&mut s, 9, "evals", SloClass::Batch, 8, 64);
        let p = s.schedule();
        assert!(p.iter().all(|p| p.id != 9), "{p:?}");
        for p in &p {
            s.push_token(p.id, 7);
        }
        // An interactive request of a tenant with nothing running takes the flood's newest slot.
        add(&mut s, 10, "web", SloClass::Interactive, 8, 64);
        let p = s.schedule();
        assert!(p.iter().any(|p| p.id == 10), "{p:?}");
        assert!(p.iter().all(|p| p.id != 3), "{p:?}");
        assert_eq!(s.num_running(), 3);
        for p in &p {
            s.push_token(p.id, 7);
        }
        // Holding one slot against the flood's two, a second request of its tenant waits its
        // turn: taking another would only swing the split the other way.
        add(&mut s, 11, "web", SloClass::Interactive, 8, 64);
        let p = s.schedule();
        assert!(p.iter().all(|p| p.id != 11), "{p:?}");
        assert_eq!(s.stats.preemptions, 1);
    }

    #[test]
    fn slots_move_toward_an_even_split_and_stop_there() {
        let mut s = with_slots(4);
        for id in 1..=4 {
            add(&mut s, id, "flood", SloClass::Interactive, 8, 64);
        }
        s.schedule();
        for id in 10..=12 {
            add(&mut s, id, "web", SloClass::Interactive, 8, 64);
        }
        s.schedule();
        let held =
            |s: &Scheduler<()>, t: &str| s.running.iter().filter(|e| &*e.tenant == t).count();
        // 4-0, then 3-1, then 2-2; the third web request waits for a slot to free.
        assert_eq!((held(&s, "flood"), held(&s, "web")), (2, 2));
        assert_eq!(s.stats.preemptions, 2);
        // The flood's oldest sequence kept its place.
        assert_eq!(s.running[0].id, 1);
    }

    #[test]
    fn an_interactive_request_takes_a_batch_sequences_slot() {
        let mut s = with_slots(2);
        for id in [1, 2] {
            add(&mut s, id, "b", SloClass::Batch, 8, 64);
        }
        s.schedule();
        for id in [1, 2] {
            s.push_token(id, 7);
        }
        add(&mut s, 3, "i", SloClass::Interactive, 8, 64);
        let p = s.schedule();
        // The newest batch sequence yields; the oldest keeps its place (sitting this step's
        // decode out for the interactive prompt) and decodes in the next.
        assert!(p.iter().any(|p| p.id == 3), "{p:?}");
        assert!(p.iter().all(|p| p.id != 2 && p.id != 1), "{p:?}");
        assert_eq!(s.num_waiting(), 1);
        assert_eq!(s.num_running(), 2);
        s.push_token(3, 7);
        let p = s.schedule();
        assert!(p.iter().any(|p| p.id == 1), "{p:?}");
        // Batch does not take batch's slot.
        let mut s = with_slots(1);
        add(&mut s, 1, "b", SloClass::Batch, 8, 64);
        s.schedule();
        s.push_token(1, 7);
        add(&mut s, 2, "c", SloClass::Batch, 8, 64);
        let p = s.schedule();
        assert_eq!(p.iter().map(|p| p.id).collect::<Vec<_>>(), vec![1]);
    }

    /// Runs `reqs` (tenant, urgency) to completion one at a time (each admitted whole, then
    /// removed) and returns the admission order.
    fn admission_order(reqs: &[(u8, Urgency)]) -> Vec<usize> {
        let mut s = with_slots(1);
        for (id, (tenant, u)) in reqs.iter().enumerate() {
            s.add(
                id as u64,
                Arc::from(format!("t{tenant}")),
                *u,
                vec![1; 4],
                8,
                true,
                (),
            );
        }
        let mut order = vec![];
        while !s.is_idle() {
            for p in s.schedule() {
                order.push(p.id as usize);
                s.remove(p.id);
            }
        }
        order
    }

    proptest! {
        #[test]
        fn each_tenant_is_served_by_priority_then_earliest_deadline(
            reqs in proptest::collection::vec((0u8..3, 0i32..2, 0u64..50, any::<bool>()), 1..40)
        ) {
            let reqs: Vec<(u8, Urgency)> = reqs
                .into_iter()
                .map(|(t, priority, deadline, batch)| {
                    let class = if batch { SloClass::Batch } else { SloClass::Interactive };
                    (t, Urgency { priority, class, deadline, itl_target: None })
                })
                .collect();
            let order = admission_order(&reqs);
            prop_assert_eq!(order.len(), reqs.len());
            for t in 0..3 {
                let keys: Vec<(i32, u64)> = order
                    .iter()
                    .filter(|&&i| reqs[i].0 == t)
                    .map(|&i| (-reqs[i].1.priority, reqs[i].1.deadline))
                    .collect();
                prop_assert!(keys.windows(2).all(|w| w[0] <= w[1]), "t{}: {:?}", t, keys);
            }
        }

        #[test]
        fn tenants_of_one_class_take_turns_whatever_their_deadlines(
            reqs in proptest::collection::vec((0u8..3, 0u64..1000), 1..60)
        ) {
            let reqs: Vec<(u8, Urgency)> = reqs
                .into_iter()
                .map(|(t, deadline)| (t, Urgency { deadline, ..urgent(SloClass::Interactive) }))
                .collect();
            let order = admission_order(&reqs);
            let mut left = [0usize; 3];
            for (t, _) in &reqs {
                left[*t as usize] += 1;
            }
            let mut served = [0usize; 3];
            for i in order {
                let t = reqs[i].0 as usize;
                // While another tenant still waits, nobody gets two turns ahead of it.
                for o in 0..3 {
                    if o != t && left[o] > 0 {
                        prop_assert!(served[t] <= served[o], "{:?} {:?}", served, left);
                    }
                }
                served[t] += 1;
                left[t] -= 1;
            }
        }
    }
}
