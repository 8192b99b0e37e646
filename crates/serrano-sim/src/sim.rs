//! One backend simulated on a virtual clock: the engine's own scheduler and block allocator
//! (`serrano-engine::scheduler`, `paged`) plan every step exactly as in a server, and a
//! performance model (the roofline of a catalog device, [`crate::roofline`]) says how long the
//! step takes instead of running the model. Requests come from a `serrano bench` workload file
//! (open-loop arrivals, lengths, tenants, a shared prefix), and come out as the load generator's
//! records, so the summary has `serrano bench --json`'s fields. Deterministic for a seed.
//!
//! Requests are planned with the engine's own pacing (`serrano-engine::pacing`: urgency at
//! admission, the step caps that keep a decode's step within its inter-token target), each
//! request in its class (interactive unless a fleet file makes its tenant batch) with the
//! engine's default targets, as a server treats them; the
//! caps price steps with a step-time model: the calibrated engine's own, or one the engine's
//! learner fits to the roofline's times.
//!
//! Arrivals are open loop (the workload's process, or a trace), or a closed loop of
//! `concurrency` clients each sending its next conversation when its last one ends; a
//! conversation's later turns follow the reply before them, sending it back as their prefix.
//! A `duration_s` ends the run as the load generator ends it: nothing is sent after it (a
//! later turn whose think time ends past it is dropped, and its client stops). Several
//! backends behind the router: [`crate::fleet`].

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use rand::SeedableRng;
use serrano_bench::energy::Energy;
use serrano_bench::metrics::{RequestRecord, Slo, Summary};
use serrano_bench::run::RunResult;
use serrano_bench::workload::{pick_weighted, Arrival, TraceEntry, Workload};
use serrano_engine::kv::BLOCK_TOKENS;
use serrano_engine::pacing::{Asks, Pacing};
use serrano_engine::paged::SharedAllocator;
use serrano_engine::scheduler::{step_shape, Planned, Scheduler, SchedulerConfig};
use serrano_engine::steptime::StepModel;
use serrano_engine::steptime::{chunk_kv_tokens, StepShape};
use serrano_engine::SloClass;

use crate::catalog::Device;
use crate::roofline::{step_time, ModelShape, Precision};
use crate::timeline::Timeline;

/// Most KV blocks one simulated backend gets (16 million positions): the allocator keeps a
/// record per block, and no single device here holds more.
pub const MAX_BLOCKS: usize = 1 << 20;
/// Most steps one simulation runs: a workload that cannot finish within this is an error, not a
/// hang.
pub const MAX_STEPS: u64 = 50_000_000;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Workload(String),
    #[error("the model's weights ({weights_gb:.1} GB) do not fit the device's {memory_gb} GB")]
    DoesNotFit { weights_gb: f64, memory_gb: f64 },
    #[error("request {0} needs more KV cache than the device holds")]
    TooLong(usize),
    #[error("the simulation stopped making progress at {0:.3} s (nothing runnable)")]
    Stuck(f64),
    #[error("stopped at {0:.3} s: too many first tokens late for the TTFT bound to be met")]
    Late(f64),
}

/// When a run may stop early because its TTFT percentile is already lost: more than
/// `allowed` of the requests from `from` on got (or will get) their first token over
/// `ttft_s` after arriving. A search over fleets only asks whether an SLO holds; an overloaded
/// fleet would otherwise be simulated to the end of a queue that only grows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LateBound {
    pub ttft_s: f64,
    pub allowed: usize,
    /// Requests before this index (the warm-up) are not judged.
    pub from: usize,
}

/// A TTFT target: this percentile of first-token times within this many seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtftTarget {
    pub percentile: f64,
    pub seconds: f64,
}

impl LateBound {
    /// The bound for a TTFT target over requests `from..n`: past it, the percentile (linear
    /// between ranks) is over the threshold whatever the rest do. Two requests more than the
    /// share above the percentile, for the interpolation's margin.
    pub fn for_target(t: TtftTarget, from: usize, n: usize) -> LateBound {
        let judged = n.saturating_sub(from) as f64;
        LateBound {
            ttft_s: t.seconds,
            allowed: (judged * (1.0 - t.percentile / 100.0)).floor() as usize + 2,
            from,
        }
    }
}

/// Counts requests whose first token is late, in arrival order, as the clock passes each
/// one's deadline.
struct LateCount {
    bound: LateBound,
    next: usize,
    late: usize,
}

impl LateCount {
    /// At `t`: whether too many are late.
    fn exceeded(&mut self, t: f64, reqs: &[Request], records: &[RequestRecord]) -> bool {
        let b = self.bound;
        while let Some(r) = reqs.get(self.next).filter(|r| r.arrival + b.ttft_s < t) {
            let deadline = r.arrival + b.ttft_s;
            let rec = &records[self.next];
            let late = rec.error.is_some() || rec.chunks.first().is_none_or(|&c| c > deadline);
            if late && self.next >= b.from {
                self.late += 1;
            }
            self.next += 1;
        }
        self.late > b.allowed
    }
}

/// How long a step takes.
#[derive(Debug, Clone)]
pub enum Timing {
    /// A catalog device's roofline for a model.
    Roofline {
        device: Device,
        model: ModelShape,
        precision: Precision,
    },
    /// A real engine's own step-time model (`serrano sim calibrate`), with its KV cache size.
    Calibrated { steps: StepModel, kv_tokens: usize },
}

impl Timing {
    fn seconds(&self, plan: &[Planned]) -> f64 {
        let sampled = plan.iter().filter(|p| p.samples).count();
        self.shape_seconds(step_shape(plan), sampled)
    }

    /// KV cache positions the backend holds.
    fn kv_tokens(&self) -> Result<f64, SimError> {
        match self {
            Timing::Roofline {
                device,
                model,
                precision,
            } => model
                .kv_capacity_tokens(device, *precision)
                .ok_or_else(|| SimError::DoesNotFit {
                    weights_gb: model.weight_bytes(*precision) / 1e9,
                    memory_gb: device.memory_gb,
                }),
            Timing::Calibrated { kv_tokens, .. } => Ok(*kv_tokens as f64),
        }
    }

    /// The step-time model the engine's caps price steps with: the calibrated one, or the
    /// engine's learner fitted to the roofline's times over decode-only and prompt shapes.
    pub fn step_model(&self) -> StepModel {
        match self {
            Timing::Calibrated { steps, .. } => steps.clone(),
            Timing::Roofline { .. } => {
                let mut m = StepModel::default();
                for k in 0..8 {
                    let n = 1usize << k;
                    let decode = StepShape {
                        prefill_tokens: 0,
                        decode_seqs: n,
                        kv_tokens: n * 512,
                    };
                    let p = 16usize << k;
                    let prefill = StepShape {
                        prefill_tokens: p,
                        decode_seqs: 0,
                        kv_tokens: chunk_kv_tokens(0, p),
                    };
                    for (shape, sampled) in [(decode, n), (prefill, 1)] {
                        m.observe(shape, self.shape_seconds(shape, sampled));
                    }
                }
                m
            }
        }
    }

    fn shape_seconds(&self, shape: StepShape, sampled: usize) -> f64 {
        match self {
            Timing::Roofline {
                device,
                model,
                precision,
            } => step_time(device, model, *precision, shape, sampled).seconds,
            Timing::Calibrated { steps, .. } => steps.predict(shape).unwrap_or(0.0),
        }
    }

    /// The device's board power, when known (a calibrated profile has none).
    pub fn power_w(&self) -> Option<f64> {
        match self {
            Timing::Roofline { device, .. } => Some(device.power_w),
            Timing::Calibrated { .. } => None,
        }
    }

    /// What the results are labelled with.
    pub fn name(&self) -> &str {
        match self {
            Timing::Roofline { device, .. } => &device.name,
            Timing::Calibrated { .. } => "calibrated",
        }
    }
}

/// What is simulated: a backend's step timing, planned like the engine.
#[derive(Debug, Clone)]
pub struct Backend {
    pub timing: Timing,
    pub scheduler: SchedulerConfig,
}

/// The arrival of a closed-loop request no client has sent yet: it arrives when an earlier
/// request ends (see [`run_nodes`]).
pub const WAITS_FOR_A_CLIENT: f64 = f64::INFINITY;

/// One request to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Seconds from the start.
    pub arrival: f64,
    pub tenant: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Leading prompt tokens every request shares (prefix caching sees them).
    pub shared_prefix: usize,
    /// Its latency class in the engine's scheduler (a fleet file's `[tenant.NAME] class`).
    pub class: SloClass,
    /// A conversation's later turn: sent this many seconds after request `.0` (the turn
    /// before it) ends, its prompt that request's prompt and reply, then its own tokens.
    pub after: Option<(usize, f64)>,
    /// A client sends it only before this time (the workload's `duration_s`); a request
    /// whose client comes later is never sent, and not in the results, as the load generator
    /// leaves it.
    pub until: f64,
}

/// The requests of a workload (warm-up first): arrivals, lengths and tenants drawn from its
/// distributions with its seed. A closed loop's requests past its clients wait for one
/// ([`WAITS_FOR_A_CLIENT`]); a conversation's later turns wait for the turn before them.
pub fn requests(w: &Workload) -> Result<Vec<Request>, SimError> {
    w.check().map_err(SimError::Workload)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(w.seed);
    // Conversations of `turns` requests (the last of the warm-up's or the run's may be
    // shorter), as the load generator splits them; one request each without turns.
    let mut sizes = Vec::new();
    for total in [w.warmup_requests, w.requests] {
        let mut left = total;
        while left > 0 {
            let n = left.min(u64::from(w.turns));
            sizes.push(n as usize);
            left -= n;
        }
    }
    let duration = w.duration_s.map(std::time::Duration::from_secs_f64);
    let starts: Vec<f64> = match w.arrival {
        // Closed loop: `concurrency` clients send their first conversations at once, and each
        // sends its next one when its last one ends (no think time), as `serrano bench
        // --concurrency` does.
        Arrival::Closed { concurrency } => (0..sizes.len())
            .map(|i| {
                if i < concurrency as usize {
                    0.0
                } else {
                    WAITS_FOR_A_CLIENT
                }
            })
            .collect(),
        _ => w
            .arrival
            .schedule(sizes.len() as u64, duration, &mut rng)
            .into_iter()
            .take_while(|t| duration.is_none_or(|d| *t <= d))
            .map(|t| t.as_secs_f64())
            .collect(),
    };
    let mut out = Vec::with_capacity(sizes.iter().sum());
    for (&start, &turns) in starts.iter().zip(&sizes) {
        let tenant = pick_weighted(w.tenants.iter().map(|t| t.weight), &mut rng);
        let own = tenant.map(|i| &w.tenants[i]);
        for k in 0..turns {
            let new = own
                .and_then(|t| t.prompt_tokens.as_ref())
                .unwrap_or(&w.prompt_tokens)
                .sample(&mut rng)
                .max(1) as usize;
            let output = own
                .and_then(|t| t.output_tokens.as_ref())
                .unwrap_or(&w.output_tokens)
                .sample(&mut rng)
                .max(1) as usize;
            // A later turn sends the earlier turns and their replies again, then its own
            // message, when the reply before it is in plus the think time.
            let (arrival, history, after) = match (k, out.last()) {
                (1.., Some(prev)) => {
                    let prev: &Request = prev;
                    let history = prev.prompt_tokens + prev.output_tokens;
                    let after = Some((out.len() - 1, w.think_time_s));
                    (WAITS_FOR_A_CLIENT, history, after)
                }
                _ => (start, 0, None),
            };
            out.push(Request {
                arrival,
                tenant: own.map(|t| t.name.clone()),
                prompt_tokens: history + new,
                output_tokens: output,
                shared_prefix: if k == 0 {
                    (w.shared_prefix_tokens as usize).min(new)
                } else {
                    0
                },
                class: SloClass::Interactive,
                after,
                until: w.duration_s.unwrap_or(f64::INFINITY),
            });
        }
    }
    Ok(out)
}

/// The requests of a trace (`serrano bench --trace`'s JSON lines), in time order: exactly the
/// arrivals and lengths a measured run replayed, `shared_prefix` tokens of each prompt shared.
pub fn requests_from_trace(entries: &[TraceEntry], shared_prefix: usize) -> Vec<Request> {
    let mut out: Vec<Request> = entries
        .iter()
        .map(|e| {
            let prompt = (e.prompt_tokens as usize).max(1);
            Request {
                arrival: e.time.max(0.0),
                tenant: e.tenant.clone(),
                prompt_tokens: prompt,
                output_tokens: (e.output_tokens as usize).max(1),
                shared_prefix: shared_prefix.min(prompt),
                class: SloClass::Interactive,
                after: None,
                until: f64::INFINITY,
            }
        })
        .collect();
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    out
}

/// Whether request `i` goes through the prefix cache, as every request does on a server with
/// it on: only when another request could share its blocks (a shared prefix, or a turn of a
/// conversation, whose next turn is the next request). Every other prompt is unique to its
/// request, so registering its blocks would change no result, only cost time (~15% of a long
/// fleet run's).
fn cacheable(i: usize, reqs: &[Request]) -> bool {
    let r = &reqs[i];
    let followed = reqs
        .get(i + 1)
        .is_some_and(|n| n.after.is_some_and(|(prev, _)| prev == i));
    r.shared_prefix > 0 || r.after.is_some() || followed
}

/// The token every simulated sequence generates (what a conversation's next turn sends back).
const GENERATED: u32 = 7;

/// Request `i`'s prompt as token ids: the shared prefix is the same for all, the rest unique to
/// the request (so the prefix cache finds what a server's would, and nothing more); a later
/// turn's starts with the turn before it and that turn's reply.
fn prompt(i: usize, reqs: &[Request]) -> Vec<u32> {
    let r = &reqs[i];
    let mut out = match r.after {
        Some((prev, _)) => {
            let mut v = prompt(prev, reqs);
            v.extend(std::iter::repeat_n(GENERATED, reqs[prev].output_tokens));
            v.truncate(r.prompt_tokens);
            v
        }
        None => Vec::with_capacity(r.prompt_tokens),
    };
    let own = out.len();
    out.extend((own..r.prompt_tokens).map(|k| {
        if k < r.shared_prefix {
            k as u32
        } else {
            (1_000_003u64
                .wrapping_mul(i as u64 + 1)
                .wrapping_add(k as u64)
                % 4_000_000_000) as u32
        }
    }));
    out
}

/// One simulated backend between and during its steps: the engine's scheduler and block
/// allocator, its pacing, and the step in flight. [`simulate`] runs one; [`crate::fleet`] runs
/// several behind the router.
pub(crate) struct Node<'a> {
    backend: &'a Backend,
    blocks: usize,
    s: Scheduler<usize>,
    pacing: Pacing,
    steps_model: StepModel,
    /// Requests that reached the backend during a step: the engine takes them between steps.
    pending: Vec<usize>,
    /// The step in flight: when it ends, and what it runs.
    step: Option<(f64, Vec<Planned>)>,
    /// One shared name per tenant: the scheduler compares and hashes tenants every step, and
    /// equal `Arc`s compare by pointer first.
    tenants: HashMap<String, Arc<str>>,
}

impl<'a> Node<'a> {
    pub(crate) fn new(backend: &'a Backend) -> Result<Node<'a>, SimError> {
        let kv_tokens = backend.timing.kv_tokens()?;
        let blocks = ((kv_tokens / BLOCK_TOKENS as f64) as usize).clamp(1, MAX_BLOCKS);
        Ok(Node {
            backend,
            blocks,
            s: Scheduler::new(backend.scheduler, SharedAllocator::new(blocks)),
            pacing: Pacing::new(serrano_engine::EngineConfig::default().itl_target),
            steps_model: backend.timing.step_model(),
            pending: Vec::new(),
            step: None,
            tenants: HashMap::new(),
        })
    }

    /// Whether the request could ever fit the backend's KV cache.
    pub(crate) fn fits(&self, r: &Request) -> bool {
        (r.prompt_tokens + r.output_tokens).div_ceil(BLOCK_TOKENS) <= self.blocks
    }

    /// Request `i` reaches the backend.
    pub(crate) fn arrive(&mut self, i: usize) {
        self.pending.push(i);
    }

    /// When the step in flight ends.
    pub(crate) fn step_end(&self) -> Option<f64> {
        self.step.as_ref().map(|(end, _)| *end)
    }

    /// KV cache blocks.
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }

    /// The step in flight (started at `t`) into backend `k`'s series: its span, the KV blocks
    /// its sequences hold and the requests still waiting for admission.
    fn record(&self, k: usize, t: f64, timeline: &mut Timeline) {
        if let Some((end, _)) = &self.step {
            let used = self.s.allocator().lock().used();
            timeline.step(k, t, *end, used, self.s.num_waiting());
        }
    }

    /// Sequences running and waiting, and KV blocks in use.
    pub(crate) fn load(&self) -> (usize, usize, usize) {
        let used = self.s.allocator().lock().used();
        (self.s.num_running(), self.s.num_waiting(), used)
    }

    /// Nothing waiting, running or in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.s.is_idle() && self.step.is_none()
    }

    /// At `t`, with no step in flight: takes the arrived requests and starts the next step,
    /// if anything can run (otherwise the engine waits for an arrival).
    pub(crate) fn start(&mut self, t: f64, reqs: &[Request]) {
        let pending = std::mem::take(&mut self.pending);
        for &i in &pending {
            let r = &reqs[i];
            self.admit(
                t,
                Admission {
                    id: i as u64,
                    tenant: r.tenant.as_deref().unwrap_or(""),
                    class: r.class,
                    arrival: r.arrival,
                    prompt: prompt(i, reqs),
                    max_len: r.prompt_tokens + r.output_tokens,
                    cacheable: cacheable(i, reqs),
                },
            );
        }
        // The vector's room is kept for the next step's arrivals.
        self.pending = pending;
        self.pending.clear();
        self.plan(t);
    }

    /// At `t`, between steps: a request enters the engine's scheduler, its urgency priced by
    /// the engine's pacing as the server's worker prices it.
    pub(crate) fn admit(&mut self, t: f64, a: Admission<'_>) {
        let asks = Asks {
            class: a.class,
            priority: 0,
            ttft_target: None,
            itl_target: None,
        };
        let tenant = match self.tenants.get(a.tenant) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(a.tenant);
                self.tenants.insert(a.tenant.to_string(), t.clone());
                t
            }
        };
        let urgency = self.pacing.urgency(&asks, clock(a.arrival), clock(t));
        self.s.add(
            a.id,
            tenant,
            urgency,
            a.prompt,
            a.max_len,
            a.cacheable,
            a.id as usize,
        );
    }

    /// At `t`, with no step in flight: plans the next step, if anything can run.
    pub(crate) fn plan(&mut self, t: f64) {
        assert!(self.step.is_none(), "a backend runs one step at a time");
        if self.s.is_idle() {
            return;
        }
        let plan = self
            .s
            .schedule_within(self.pacing.caps(&self.s, &self.steps_model, clock(t)));
        if !plan.is_empty() {
            self.step = Some((t + self.backend.timing.seconds(&plan), plan));
        }
    }

    /// Ends the step in flight: its end and its plan; each sequence that sampled a token in it
    /// (`samples`) the caller then either continues ([`Node::push_token`]) or removes. The plan
    /// itself, not a list of ids: a step is the simulator's innermost loop.
    pub(crate) fn end_step(&mut self) -> Option<(f64, Vec<Planned>)> {
        let (t, plan) = self.step.take()?;
        self.s.after_step();
        Some((t, plan))
    }

    /// Sequence `id` goes on with the token it sampled.
    pub(crate) fn push_token(&mut self, id: u64) {
        self.s.push_token(id, GENERATED);
    }

    /// Sequence `id` leaves: its blocks return to the pool.
    pub(crate) fn remove(&mut self, id: u64) {
        self.s.remove(id);
    }

    /// Ends the step in flight: each sampled token's time goes to its request's record.
    /// Returns the step's end and the requests it finished.
    pub(crate) fn finish(
        &mut self,
        reqs: &[Request],
        records: &mut [RequestRecord],
        generated: &mut [usize],
    ) -> (f64, Vec<usize>) {
        let Some((t, plan)) = self.end_step() else {
            return (0.0, Vec::new());
        };
        let mut done = Vec::new();
        for id in plan.iter().filter(|p| p.samples).map(|p| p.id) {
            let i = id as usize;
            generated[i] += 1;
            if records[i].chunks.is_empty() {
                // Every token's time is kept: room for all of them at once, not a doubling
                // reallocation every few tokens.
                records[i].chunks.reserve_exact(reqs[i].output_tokens);
            }
            records[i].chunks.push(t);
            if generated[i] >= reqs[i].output_tokens {
                self.remove(id);
                records[i].end = t;
                records[i].output_tokens = generated[i] as u64;
                done.push(i);
            } else {
                self.push_token(id);
            }
        }
        (t, done)
    }
}

/// A request entering a backend's scheduler.
pub(crate) struct Admission<'t> {
    /// Its sequence id (unique among the backend's live sequences).
    pub id: u64,
    pub tenant: &'t str,
    pub class: SloClass,
    /// When it arrived (its first-token deadline counts from here).
    pub arrival: f64,
    pub prompt: Vec<u32>,
    /// Prompt and output tokens: the KV positions it may need.
    pub max_len: usize,
    /// Whether its blocks go through the prefix cache.
    pub cacheable: bool,
}

fn clock(t: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(t.max(0.0))
}

/// An empty record per request: its tenant, arrival and prompt length.
fn new_records(reqs: &[Request]) -> Vec<RequestRecord> {
    reqs.iter()
        .map(|r| RequestRecord {
            tenant: r.tenant.clone(),
            intended: r.arrival,
            sent: r.arrival,
            prompt_tokens: r.prompt_tokens as u64,
            ..Default::default()
        })
        .collect()
}

/// Runs `reqs` through the backend; one record per request, in request order, each with its
/// tokens' times, and the backend's timeline.
pub fn simulate(b: &Backend, reqs: &[Request]) -> Result<(Vec<RequestRecord>, Timeline), SimError> {
    let mut nodes = [Node::new(b)?];
    if let Some(i) = reqs.iter().position(|r| !nodes[0].fits(r)) {
        return Err(SimError::TooLong(i));
    }
    let run = run_nodes(&mut nodes, reqs, None, |_, _, _| Ok((0, ())), |_, _, _| {})?;
    Ok((run.records, run.timeline))
}

/// A run of several backends.
pub(crate) struct NodesRun {
    /// Request by request, its record and the backend that took it.
    pub records: Vec<RequestRecord>,
    pub node_of: Vec<Option<usize>>,
    /// What each backend was doing over the run.
    pub timeline: Timeline,
}

/// Steps `nodes` on one virtual clock over `reqs`. Each arrival goes to the backend `route`
/// names (with a token that `done` gets back when the request finishes), or gets the error
/// `route` gives, as its client would; arrivals up to a step's end reach their engines before
/// that step ends, as the engine's worker takes requests between steps. A request that waits
/// for a client arrives when one is free: a closed loop's next request when any request ends,
/// a conversation's next turn when the turn before it ends (plus the think time; a failed turn
/// fails the rest of its conversation). Ties go to the lower index (arrivals and backends'
/// step ends alike), so a run is deterministic. With a `late` bound, the run ends with
/// [`SimError::Late`] once the bound is passed.
pub(crate) fn run_nodes<A>(
    nodes: &mut [Node<'_>],
    reqs: &[Request],
    late: Option<LateBound>,
    mut route: impl FnMut(&Request, f64, &[Node<'_>]) -> Result<(usize, A), String>,
    mut done: impl FnMut(A, f64, &RequestRecord),
) -> Result<NodesRun, SimError> {
    let mut records = new_records(reqs);
    let mut generated = vec![0usize; reqs.len()];
    let mut tokens: Vec<Option<A>> = (0..reqs.len()).map(|_| None).collect();
    let mut node_of = vec![None; reqs.len()];
    let span = reqs
        .iter()
        .map(|r| r.arrival)
        .filter(|a| a.is_finite())
        .fold(0.0, f64::max);
    let mut timeline = Timeline::new(nodes.iter().map(Node::blocks).collect(), span);
    let mut clients = Clients::new(reqs);
    let mut steps = 0u64;
    let mut late = late.map(|bound| LateCount {
        bound,
        next: 0,
        late: 0,
    });
    loop {
        let first_end = nodes
            .iter()
            .enumerate()
            .filter_map(|(k, n)| n.step_end().map(|e| (e, k)))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let arrival = clients.next_arrival();
        if let Some(ta) = arrival.filter(|&ta| first_end.is_none_or(|(e, _)| ta <= e)) {
            let mut reached = Vec::new();
            while let Some(i) = clients.pop_arrived(ta) {
                match route(&clients.reqs[i], ta, nodes) {
                    Ok((k, token)) => {
                        nodes[k].arrive(i);
                        tokens[i] = Some(token);
                        node_of[i] = Some(k);
                        reached.push(k);
                    }
                    Err(e) => {
                        records[i].error = Some(e);
                        records[i].end = ta;
                        clients.ended(i, ta, false, &mut records);
                    }
                }
            }
            for k in reached {
                if nodes[k].step_end().is_none() {
                    nodes[k].start(ta, &clients.reqs);
                    nodes[k].record(k, ta, &mut timeline);
                }
            }
        } else if let Some((e, k)) = first_end {
            steps += 1;
            if steps > MAX_STEPS {
                return Err(SimError::Stuck(e));
            }
            let (t, finished) = nodes[k].finish(&clients.reqs, &mut records, &mut generated);
            if late
                .as_mut()
                .is_some_and(|l| l.exceeded(t, &clients.reqs, &records))
            {
                return Err(SimError::Late(t));
            }
            for i in finished {
                if let Some(token) = tokens[i].take() {
                    done(token, t, &records[i]);
                }
                clients.ended(i, t, true, &mut records);
            }
            nodes[k].start(t, &clients.reqs);
            nodes[k].record(k, t, &mut timeline);
        } else if nodes.iter().all(Node::is_idle) {
            return Ok(NodesRun {
                records,
                node_of,
                timeline,
            });
        } else {
            // Requests wait, nothing can run, and none will arrive.
            let t = records.iter().map(|r| r.end).fold(0.0, f64::max);
            return Err(SimError::Stuck(t));
        }
    }
}

/// The run's arrivals in time order (ties by index), and the clients that send a request only
/// once an earlier one has ended: a closed loop's, a conversation's.
struct Clients<'r> {
    /// The requests, copied only when a client gives one its arrival.
    reqs: Cow<'r, [Request]>,
    /// Arrival times (the bits of a non-negative `f64` order as the number does) and indices.
    arrivals: BinaryHeap<Reverse<(u64, usize)>>,
    /// The closed loop's next unsent request.
    unsent: Option<usize>,
    /// Each request's next turn.
    next_turn: Vec<Option<usize>>,
}

impl<'r> Clients<'r> {
    fn new(reqs: &'r [Request]) -> Clients<'r> {
        let arrivals = reqs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.arrival.is_finite())
            .map(|(i, r)| Reverse((r.arrival.max(0.0).to_bits(), i)))
            .collect();
        let mut next_turn = vec![None; reqs.len()];
        for (j, r) in reqs.iter().enumerate() {
            if let Some((prev, _)) = r.after {
                next_turn[prev] = Some(j);
            }
        }
        let unsent = reqs
            .iter()
            .position(|r| r.arrival == WAITS_FOR_A_CLIENT && r.after.is_none());
        Clients {
            reqs: Cow::Borrowed(reqs),
            arrivals,
            unsent,
            next_turn,
        }
    }

    fn next_arrival(&self) -> Option<f64> {
        self.arrivals
            .peek()
            .map(|Reverse((t, _))| f64::from_bits(*t))
    }

    /// The next request arriving by `t`.
    fn pop_arrived(&mut self, t: f64) -> Option<usize> {
        let Reverse((at, i)) = *self.arrivals.peek()?;
        (f64::from_bits(at) <= t).then(|| {
            self.arrivals.pop();
            i
        })
    }

    /// Request `i` ended at `t` (`ok`: answered, else refused): its client sends what waits
    /// for it. A conversation's next turn goes the think time later, while the run's time
    /// lasts; once the conversation is over (its last turn, a failed turn, or time up), a
    /// closed loop's client sends the next conversation, while the time lasts.
    fn ended(&mut self, i: usize, t: f64, ok: bool, records: &mut [RequestRecord]) {
        // When the client is free for its next conversation.
        let mut free = t;
        if let Some(j) = self.next_turn[i] {
            let at = t + self.reqs[j].after.map_or(0.0, |(_, s)| s);
            if !ok {
                // As the load generator does, a conversation ends at its first failed turn;
                // here its later turns are recorded as failed with it.
                records[j].error = Some("an earlier turn of the conversation failed".into());
                records[j].intended = t;
                records[j].sent = t;
                records[j].end = t;
                self.ended(j, t, false, records);
                return;
            }
            if at < self.reqs[j].until {
                self.send(j, at, records);
                return;
            }
            // The client waited the think time to find the run over: the later turns are
            // never sent, and neither is anything else of this client's.
            free = at;
        }
        let Some(j) = self.unsent else {
            return;
        };
        if free >= self.reqs[j].until {
            return;
        }
        self.unsent = self
            .reqs
            .iter()
            .enumerate()
            .skip(j + 1)
            .find(|(_, r)| r.after.is_none())
            .filter(|(_, r)| r.arrival == WAITS_FOR_A_CLIENT)
            .map(|(k, _)| k);
        self.send(j, free, records);
    }

    fn send(&mut self, j: usize, t: f64, records: &mut [RequestRecord]) {
        self.reqs.to_mut()[j].arrival = t;
        records[j].intended = t;
        records[j].sent = t;
        self.arrivals.push(Reverse((t.max(0.0).to_bits(), j)));
    }
}

/// A whole simulated run of a workload, summarized as `serrano bench` summarizes a measured
/// one (the warm-up requests left out); with a trace, its requests (no warm-up), the workload
/// giving the tenants' SLOs and the shared prefix.
pub fn run(
    b: &Backend,
    w: &Workload,
    trace: Option<&[TraceEntry]>,
    slo: Option<&Slo>,
    name: &str,
) -> Result<SimRun, SimError> {
    let (reqs, warmup) = run_requests(w, trace)?;
    let (records, timeline) = simulate(b, &reqs)?;
    let sent = records.iter().skip(warmup);
    let taken = vec![sent.filter(|r| r.intended.is_finite()).count()];
    let url = format!("sim://{}", b.timing.name());
    let mut result = summarize(w, records, warmup, slo, name, url)?;
    result.energy = modelled_energy(b.timing.power_w(), &result.summary);
    Ok(SimRun {
        result,
        taken,
        timeline,
    })
}

/// A simulated run's energy: `watts` (the backends' board power together) for the run's whole
/// duration, as its cost counts the backends' price for the whole run: an upper bound (a device
/// idles below its board power), stated in `scope`. `None` when a backend's power is unknown.
pub(crate) fn modelled_energy(watts: Option<f64>, s: &Summary) -> Option<Energy> {
    let watts = watts.filter(|w| w.is_finite() && *w >= 0.0)?;
    let joules = watts * s.duration;
    Some(Energy {
        joules,
        joules_per_output_token: (s.total_output_tokens > 0)
            .then(|| joules / s.total_output_tokens as f64),
        mean_watts: watts,
        scope:
            "modelled: every backend at its catalog board power for the whole run (an upper bound)"
                .into(),
    })
}

/// A simulated run: summarized as `serrano bench` summarizes a measured one, with the requests
/// each backend took (the warm-up left out) and what each backend was doing over the run (the
/// warm-up in).
#[derive(Debug)]
pub struct SimRun {
    pub result: RunResult,
    pub taken: Vec<usize>,
    pub timeline: Timeline,
}

/// The requests a run replays: a trace's (no warm-up), or the workload's own draw.
pub(crate) fn run_requests(
    w: &Workload,
    trace: Option<&[TraceEntry]>,
) -> Result<(Vec<Request>, usize), SimError> {
    Ok(match trace {
        Some(t) => (requests_from_trace(t, w.shared_prefix_tokens as usize), 0),
        None => (requests(w)?, w.warmup_requests as usize),
    })
}

/// A simulated run's records summarized as `serrano bench` summarizes a measured run's, the
/// first `warmup` left out.
pub(crate) fn summarize(
    w: &Workload,
    mut records: Vec<RequestRecord>,
    warmup: usize,
    slo: Option<&Slo>,
    name: &str,
    url: String,
) -> Result<RunResult, SimError> {
    let mut measured = records.split_off(warmup.min(records.len()));
    // Requests no client sent before the run's end (`duration_s`) are not the run's.
    measured.retain(|r| r.intended.is_finite());
    let (summary, tenants) = serrano_bench::run::judge(w, &measured, slo)
        .map_err(|e| SimError::Workload(e.to_string()))?;
    let burstiness = match w.arrival {
        Arrival::Gamma { cv, .. } => Some(1.0 / (cv * cv)),
        _ => None,
    };
    Ok(RunResult {
        url,
        model: name.to_string(),
        workload: w.name.clone(),
        request_rate: w.arrival.rate(),
        max_concurrency: None,
        burstiness,
        exact_prompt_lengths: true,
        summary,
        tenants,
        energy: None,
        gpu_energy: None,
        records: measured,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every step memory-bound at exactly 2 ms: 2 GB of weights at 1 TB/s, no overhead,
    /// compute far from the roof for these sizes.
    pub(crate) fn backend(max_num_seqs: usize) -> Backend {
        let device = Device {
            name: "toy".into(),
            source: "test".into(),
            bf16_tflops: 1e6,
            int8_tops: 1e6,
            memory_gbs: 1000.0,
            memory_gb: 100.0,
            interconnect_gbs: 1.0,
            power_w: 100.0,
            price_per_hour: 1.0,
            compute_efficiency: 1.0,
            memory_efficiency: 1.0,
            step_overhead_us: 0.0,
        };
        Backend {
            timing: Timing::Roofline {
                device,
                model: toy_model(),
                precision: Precision::Bf16,
            },
            scheduler: SchedulerConfig {
                max_num_seqs,
                max_batch_tokens: 256,
            },
        }
    }

    /// A billion weights read once a step, a byte of KV per position.
    pub(crate) fn toy_model() -> ModelShape {
        ModelShape {
            layer_params: 1e9,
            head_params: 0.0,
            total_params: 1e9,
            n_layers: 1,
            attn_width: 0,
            kv_bytes_per_token: 1.0,
        }
    }

    pub(crate) fn req(arrival: f64, prompt: usize, output: usize) -> Request {
        Request {
            arrival,
            tenant: None,
            prompt_tokens: prompt,
            output_tokens: output,
            shared_prefix: 0,
            class: SloClass::Interactive,
            after: None,
            until: f64::INFINITY,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn one_request_takes_a_step_per_token() {
        let (r, _) = simulate(&backend(4), &[req(0.5, 100, 10)]).unwrap();
        // The prompt in one step (its first token), then nine decodes: 2 ms each (plus the KV
        // bytes, a byte a position here).
        assert_eq!(r[0].chunks.len(), 10);
        assert!(close(r[0].ttft().unwrap(), 0.002), "{:?}", r[0]);
        assert!(close(r[0].e2e(), 0.020), "{:?}", r[0]);
        assert!(close(r[0].tpot().unwrap(), 0.002), "{:?}", r[0]);
        assert_eq!(r[0].output_tokens, 10);
    }

    #[test]
    fn a_request_waits_for_a_slot_and_batches_share_a_step() {
        // One slot: the second request starts when the first ends.
        let (r, timeline) = simulate(&backend(1), &[req(0.0, 16, 5), req(0.0, 16, 5)]).unwrap();
        assert!(
            close(r[0].end, 0.010) && close(r[1].ttft().unwrap(), 0.012),
            "{r:?}"
        );
        // Busy throughout (ten 2 ms steps in two 10 ms bins), the second request waiting
        // through the first bin.
        let a = timeline.averages(0);
        assert!(a.utilization.iter().all(|&u| close(u, 1.0)), "{a:?}");
        assert!(close(a.queue[0], 1.0) && close(a.queue[1], 0.0), "{a:?}");
        // Two slots: both in every step, done together.
        let (r, timeline) = simulate(&backend(2), &[req(0.0, 16, 5), req(0.0, 16, 5)]).unwrap();
        assert!(close(r[0].end, 0.010) && close(r[1].end, 0.010), "{r:?}");
        assert!(close(timeline.overall(0).2, 0.0), "{timeline:?}");
    }

    #[test]
    fn a_calibrated_engines_own_step_model_times_the_steps() {
        // 1 ms a step, 0.1 ms a prompt token, 0.5 ms a decoding sequence.
        let b = Backend {
            timing: Timing::Calibrated {
                steps: StepModel::from_coefficients([1e-3, 1e-4, 5e-4, 0.0]),
                kv_tokens: 4096,
            },
            ..backend(4)
        };
        let (r, _) = simulate(&b, &[req(0.0, 100, 3)]).unwrap();
        // Prefill: 1 + 100 x 0.1 = 11 ms; each decode 1 + 0.5 = 1.5 ms.
        assert!(close(r[0].ttft().unwrap(), 0.011), "{:?}", r[0]);
        assert!(close(r[0].e2e(), 0.014), "{:?}", r[0]);
    }

    #[test]
    fn a_workload_is_simulated_the_same_for_the_same_seed() {
        let w = Workload::parse(
            "requests = 200\nprompt_tokens = { dist = \"uniform\", min = 16, max = 256 }\n\
             output_tokens = { dist = \"uniform\", min = 8, max = 64 }\n\
             arrival = { kind = \"gamma\", rate = 50.0, cv = 2.0 }\nseed = 3\n",
            false,
        )
        .unwrap();
        let b = backend(8);
        let a = run(&b, &w, None, None, "m").unwrap();
        let again = run(&b, &w, None, None, "m").unwrap();
        assert_eq!(a.timeline, again.timeline);
        let a = a.result;
        assert_eq!(a.records, again.result.records);
        assert_eq!(a.summary.completed, 200);
        // Energy: the toy device's 100 W for the whole run.
        let e = a.energy.as_ref().unwrap();
        assert!(close(e.joules, 100.0 * a.summary.duration), "{e:?}");
        let per_token = e.joules / a.summary.total_output_tokens as f64;
        assert!(
            close(e.joules_per_output_token.unwrap(), per_token),
            "{e:?}"
        );
        let other = Workload {
            seed: 4,
            ..w.clone()
        };
        assert_ne!(
            run(&b, &other, None, None, "m").unwrap().result.records,
            a.records
        );
        // A trace is replayed as written: its arrivals and lengths, in time order.
        let trace = serrano_bench::workload::parse_trace(
            "{\"time\": 0.5, \"prompt_tokens\": 20, \"output_tokens\": 3}\n\
             {\"time\": 0.1, \"prompt_tokens\": 40, \"output_tokens\": 5}\n",
        )
        .unwrap();
        let r = run(&b, &w, Some(&trace), None, "m").unwrap().result;
        let sent: Vec<f64> = r.records.iter().map(|r| r.sent).collect();
        assert_eq!(sent, [0.1, 0.5]);
        let lens: Vec<u64> = r.records.iter().map(|r| r.output_tokens).collect();
        assert_eq!(lens, [5, 3]);
    }

    #[test]
    fn what_cannot_be_simulated_is_refused() {
        let mut b = backend(1);
        if let Timing::Roofline { device, .. } = &mut b.timing {
            device.memory_gb = 1.0;
        }
        assert!(matches!(
            simulate(&b, &[req(0.0, 1, 1)]),
            Err(SimError::DoesNotFit { .. })
        ));
    }

    /// A closed loop of two clients over six requests: two at once from the start, and each
    /// next one sent the moment an earlier one ends, so never more than two in flight.
    #[test]
    fn a_closed_loop_sends_each_request_when_a_client_is_free() {
        let w = Workload::parse(
            "requests = 6\nwarmup_requests = 0\nprompt_tokens = { dist = \"fixed\", value = 16 }\n\
             output_tokens = { dist = \"fixed\", value = 5 }\n\
             arrival = { kind = \"closed\", concurrency = 2 }\n",
            false,
        )
        .unwrap();
        let reqs = requests(&w).unwrap();
        assert_eq!(reqs[1].arrival, 0.0);
        assert_eq!(reqs[2].arrival, WAITS_FOR_A_CLIENT);
        let r = run(&backend(8), &w, None, None, "m").unwrap().result;
        assert_eq!(r.summary.completed, 6);
        // Each pair shares its five 2 ms steps: sent at 0, 10 and 20 ms, done 10 ms later.
        for (i, rec) in r.records.iter().enumerate() {
            let round = (i / 2) as f64 * 0.010;
            assert!(
                close(rec.sent, round) && close(rec.end, round + 0.010),
                "{i}: {rec:?}"
            );
        }
        assert!(r.request_rate.is_infinite());
    }

    /// A conversation's next turn goes the think time after the reply before it, its prompt
    /// that turn's prompt and reply then its own message, so the prefix cache serves the
    /// history: 420 prompt tokens take one 256-token step, not two.
    #[test]
    fn a_conversations_next_turn_follows_the_reply_and_reuses_its_prefix() {
        let w = Workload::parse(
            "endpoint = \"chat\"\nrequests = 4\nwarmup_requests = 0\nturns = 2\n\
             think_time_s = 0.5\nprompt_tokens = { dist = \"fixed\", value = 200 }\n\
             output_tokens = { dist = \"fixed\", value = 20 }\n\
             arrival = { kind = \"poisson\", rate = 0.5 }\nseed = 2\n",
            false,
        )
        .unwrap();
        let reqs = requests(&w).unwrap();
        assert_eq!(reqs.len(), 4);
        assert_eq!(
            (reqs[1].after, reqs[1].prompt_tokens),
            (Some((0, 0.5)), 420)
        );
        assert_eq!(reqs[3].after, Some((2, 0.5)));
        let (first, second) = (prompt(0, &reqs), prompt(1, &reqs));
        assert_eq!(second[..200], first[..]);
        assert!(second[200..220].iter().all(|&t| t == GENERATED));
        assert!(second[220..].iter().all(|t| !first.contains(t)));
        let r = run(&backend(8), &w, None, None, "m").unwrap().result;
        assert_eq!(r.summary.completed, 4);
        for (turn, next) in [(0, 1), (2, 3)] {
            let (a, b) = (&r.records[turn], &r.records[next]);
            assert!(close(b.sent, a.end + 0.5), "{a:?} {b:?}");
            assert!(b.ttft().unwrap() < 0.003, "{b:?}");
        }
    }

    /// One client, conversations of two turns half a second apart, a run of one second: the
    /// first conversation whole (turns at 0 and 0.51 s), the second's first turn (sent at
    /// 0.52 s, when the first conversation ends); its second turn would go at 1.03 s, past the
    /// end, so the client stops there, and the third conversation is never sent, nor counted.
    #[test]
    fn a_closed_loop_of_conversations_stops_at_the_runs_end() {
        let w = Workload::parse(
            "endpoint = \"chat\"\nrequests = 6\nwarmup_requests = 0\nturns = 2\n\
             think_time_s = 0.5\nduration_s = 1.0\nprompt_tokens = { dist = \"fixed\", value = 16 }\n\
             output_tokens = { dist = \"fixed\", value = 5 }\n\
             arrival = { kind = \"closed\", concurrency = 1 }\n",
            false,
        )
        .unwrap();
        let reqs = requests(&w).unwrap();
        assert_eq!(reqs.len(), 6);
        assert_eq!(reqs[0].arrival, 0.0);
        assert_eq!(reqs[2].arrival, WAITS_FOR_A_CLIENT);
        let r = run(&backend(8), &w, None, None, "m").unwrap();
        let sent: Vec<f64> = r.result.records.iter().map(|r| r.sent).collect();
        assert_eq!(sent.len(), 3, "{sent:?}");
        for (got, want) in sent.iter().zip([0.0, 0.51, 0.52]) {
            assert!((got - want).abs() < 1e-3, "{sent:?}");
        }
        assert_eq!(r.result.summary.completed, 3);
        assert_eq!(r.taken, [3]);
    }
}
