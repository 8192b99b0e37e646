//! A simulated device on the wall clock: the same [`Node`] a simulation steps on its virtual
//! clock (the engine's scheduler and block allocator, the engine's pacing, a performance model
//! for each step's time), stepped in real time on a thread of its own. Each step sleeps the
//! time the model gives it, then releases one token to every sequence that sampled in it. A
//! server's `sim` backend (`serrano-server::simulated`) holds each generated token until its
//! sequence's release, so routing, budgets, dashboards and benchmarks meet a tier that does
//! not exist at the pace it would have.
//!
//! Runtime-agnostic: sequences arrive through a bounded channel and report through a
//! [`Sink`] the caller implements (a server's is a `tokio::sync::watch` sender).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serrano_engine::kv::BLOCK_TOKENS;
use serrano_engine::SloClass;

use crate::sim::{Admission, Backend, Node, SimError};

/// Submissions waiting for the device's thread (each a request's sequences); past it,
/// [`Device::submit`] answers [`Refusal::Busy`].
pub const QUEUE: usize = 1024;
/// Most sequences one device holds, waiting or running: each holds its prompt's token ids and
/// a record in the scheduler.
pub const MAX_SEQUENCES: usize = 4096;

/// Where a sequence's released tokens go.
pub trait Sink: Send + 'static {
    /// `released` tokens of the sequence are out in all; `false`: nobody listens any more (the
    /// sequence leaves the device).
    fn release(&mut self, released: u64) -> bool;
    /// Whether nobody listens any more (checked between steps, so that a sequence whose
    /// client left while it waited frees its place).
    fn gone(&self) -> bool;
}

/// One sequence for the device: a choice of a request.
pub struct Sequence {
    pub tenant: String,
    pub class: SloClass,
    /// The prompt's token ids (the prefix cache sees them).
    pub prompt: Vec<u32>,
    /// Tokens to release at most.
    pub max_tokens: usize,
    /// Whether its blocks go through the prefix cache (as the server's own engine does).
    pub cacheable: bool,
    pub sink: Box<dyn Sink>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the simulated device holds {MAX_SEQUENCES} sequences or {QUEUE} waiting requests")]
    Busy,
    #[error(
        "the simulated device's KV cache holds {kv_tokens} tokens; this request may need {needs}"
    )]
    TooLong { needs: usize, kv_tokens: usize },
    #[error("the simulated device has stopped")]
    Stopped,
}

/// What a device is doing, as its thread last saw it (for dashboards).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Sequences admitted and running.
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Share of the KV cache's blocks in use.
    pub kv_usage: f64,
    /// Steps run since the device started.
    pub steps: u64,
}

/// The thread's view of its load, published after every step.
#[derive(Default)]
struct Gauges {
    running: AtomicUsize,
    waiting: AtomicUsize,
    kv_blocks: AtomicUsize,
    steps: AtomicU64,
}

/// A device stepping on its own thread; dropping it lets the thread finish what it holds and
/// end.
pub struct Device {
    queue: SyncSender<Vec<Sequence>>,
    blocks: usize,
    /// Sequences submitted and not yet gone, across the queue and the thread.
    held: Arc<AtomicUsize>,
    gauges: Arc<Gauges>,
}

impl Device {
    /// Starts `backend`'s device on a thread named after `name`.
    pub fn start(name: &str, backend: Backend) -> Result<Device, SimError> {
        let blocks = Node::new(&backend)?.blocks();
        let (queue, arrivals) = sync_channel(QUEUE);
        let held = Arc::new(AtomicUsize::new(0));
        let gauges = Arc::new(Gauges::default());
        let (counted, published) = (held.clone(), gauges.clone());
        std::thread::Builder::new()
            .name(format!("sim-{}", name.chars().take(10).collect::<String>()))
            .spawn(move || run(&backend, &arrivals, &counted, &published))
            .map_err(|e| SimError::Workload(format!("cannot start the device's thread: {e}")))?;
        Ok(Device {
            queue,
            blocks,
            held,
            gauges,
        })
    }

    /// What the device is doing, as of its last step.
    pub fn load(&self) -> Load {
        let g = &self.gauges;
        Load {
            running: g.running.load(Ordering::Relaxed),
            waiting: g.waiting.load(Ordering::Relaxed),
            kv_usage: g.kv_blocks.load(Ordering::Relaxed) as f64 / self.blocks.max(1) as f64,
            steps: g.steps.load(Ordering::Relaxed),
        }
    }

    /// KV cache positions the device holds.
    pub fn kv_tokens(&self) -> usize {
        self.blocks * BLOCK_TOKENS
    }

    /// Whether a sequence of `prompt` and `max_tokens` tokens could ever fit the KV cache.
    pub fn check_fits(&self, prompt: usize, max_tokens: usize) -> Result<(), Refusal> {
        let needs = prompt.saturating_add(max_tokens);
        if needs.div_ceil(BLOCK_TOKENS) > self.blocks {
            return Err(Refusal::TooLong {
                needs,
                kv_tokens: self.kv_tokens(),
            });
        }
        Ok(())
    }

    /// A request's sequences reach the device (admitted together at its next step's start).
    pub fn submit(&self, seqs: Vec<Sequence>) -> Result<(), Refusal> {
        for s in &seqs {
            self.check_fits(s.prompt.len(), s.max_tokens)?;
        }
        let n = seqs.len();
        let before = self.held.fetch_add(n, Ordering::AcqRel);
        if before + n > MAX_SEQUENCES {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return Err(Refusal::Busy);
        }
        self.queue.try_send(seqs).map_err(|e| {
            self.held.fetch_sub(n, Ordering::AcqRel);
            match e {
                TrySendError::Full(_) => Refusal::Busy,
                TrySendError::Disconnected(_) => Refusal::Stopped,
            }
        })
    }
}

/// A sequence on the device.
struct Live {
    sink: Box<dyn Sink>,
    released: u64,
    max_tokens: u64,
}

/// The device's thread: steps while anything can run, sleeps on the queue otherwise, and ends
/// once the [`Device`] is dropped and what it held is done.
fn run(backend: &Backend, arrivals: &Receiver<Vec<Sequence>>, held: &AtomicUsize, gauges: &Gauges) {
    let Ok(mut node) = Node::new(backend) else {
        return;
    };
    let epoch = Instant::now();
    let now = || epoch.elapsed().as_secs_f64();
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut next_id = 0u64;
    // Requests that arrived during a step, with their arrival times: the engine takes them
    // between steps.
    let mut waiting: Vec<(f64, Vec<Sequence>)> = Vec::new();
    let mut open = true;
    loop {
        if live.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match arrivals.recv() {
                Ok(seqs) => waiting.push((now(), seqs)),
                Err(_) => return,
            }
        }
        while let Ok(seqs) = arrivals.try_recv() {
            waiting.push((now(), seqs));
        }
        let t = now();
        for (arrival, seqs) in waiting.drain(..) {
            for s in seqs {
                let id = next_id;
                next_id += 1;
                node.admit(
                    t,
                    Admission {
                        id,
                        tenant: &s.tenant,
                        class: s.class,
                        arrival,
                        max_len: s.prompt.len() + s.max_tokens,
                        prompt: s.prompt,
                        cacheable: s.cacheable,
                    },
                );
                let seq = Live {
                    sink: s.sink,
                    released: 0,
                    max_tokens: s.max_tokens as u64,
                };
                live.insert(id, seq);
            }
        }
        live.retain(|&id, l| {
            let stay = !l.sink.gone();
            if !stay {
                node.remove(id);
                held.fetch_sub(1, Ordering::AcqRel);
            }
            stay
        });
        node.plan(t);
        let Some(end) = node.step_end() else {
            // Sequences wait and none can run (every block held): wait for one to leave.
            if !live.is_empty() {
                wait(arrivals, &mut waiting, &mut open, epoch, t + 0.01);
            }
            continue;
        };
        wait(arrivals, &mut waiting, &mut open, epoch, end);
        let Some((_, plan)) = node.end_step() else {
            continue;
        };
        gauges.steps.fetch_add(1, Ordering::Relaxed);
        for id in plan.iter().filter(|p| p.samples).map(|p| p.id) {
            let Some(l) = live.get_mut(&id) else {
                // Every planned sequence is one of ours; a stray id is dropped, not released.
                node.remove(id);
                continue;
            };
            l.released += 1;
            let listening = l.sink.release(l.released);
            if listening && l.released < l.max_tokens {
                node.push_token(id);
            } else {
                node.remove(id);
                live.remove(&id);
                held.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let (running, queued, kv_blocks) = node.load();
        gauges.running.store(running, Ordering::Relaxed);
        gauges.waiting.store(queued, Ordering::Relaxed);
        gauges.kv_blocks.store(kv_blocks, Ordering::Relaxed);
    }
}

/// Waits until `until` (seconds from `epoch`), taking arrivals meanwhile; a closed queue
/// (the device dropped) just waits.
fn wait(
    arrivals: &Receiver<Vec<Sequence>>,
    waiting: &mut Vec<(f64, Vec<Sequence>)>,
    open: &mut bool,
    epoch: Instant,
    until: f64,
) {
    loop {
        let left = until - epoch.elapsed().as_secs_f64();
        if left <= 0.0 {
            return;
        }
        let left = Duration::from_secs_f64(left);
        if !*open {
            std::thread::sleep(left);
            return;
        }
        match arrivals.recv_timeout(left) {
            Ok(seqs) => waiting.push((epoch.elapsed().as_secs_f64(), seqs)),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => *open = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Timing;
    use serrano_engine::scheduler::SchedulerConfig;
    use serrano_engine::steptime::StepModel;
    use std::sync::Mutex;

    /// Release times of a sequence, seconds from the test's start.
    #[derive(Clone, Default)]
    struct Times(Arc<Mutex<Vec<f64>>>, Option<Instant>);

    impl Sink for Times {
        fn release(&mut self, released: u64) -> bool {
            let t0 = self.1.unwrap_or_else(Instant::now);
            let mut v = self.0.lock().unwrap();
            v.push(t0.elapsed().as_secs_f64());
            assert_eq!(v.len() as u64, released);
            true
        }
        fn gone(&self) -> bool {
            false
        }
    }

    /// A device whose every step takes `decode` seconds plus `per_token` per prompt token.
    fn device(decode: f64, per_token: f64) -> Device {
        let steps = StepModel::from_coefficients([decode, per_token, 0.0, 0.0]);
        let backend = Backend {
            timing: Timing::Calibrated {
                steps,
                kv_tokens: 4096,
            },
            scheduler: SchedulerConfig {
                max_num_seqs: 8,
                max_batch_tokens: 512,
            },
        };
        Device::start("test", backend).unwrap()
    }

    fn sequence(prompt: usize, max_tokens: usize, sink: Times) -> Sequence {
        Sequence {
            tenant: "t".into(),
            class: SloClass::Interactive,
            prompt: (0..prompt as u32).collect(),
            max_tokens,
            cacheable: true,
            sink: Box::new(sink),
        }
    }

    #[test]
    fn tokens_come_at_the_modelled_pace() {
        // 20 ms a decode step, 0.1 ms a prompt token: a 200-token prompt's first token at
        // about 40 ms, then one every 20 ms.
        let d = device(0.020, 0.0001);
        let times = Times(Arc::default(), Some(Instant::now()));
        d.submit(vec![sequence(200, 5, times.clone())]).unwrap();
        // Polled, with room for a loaded machine: the bounds below are what is judged.
        let deadline = Instant::now() + Duration::from_secs(3);
        while times.0.lock().unwrap().len() < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let v = times.0.lock().unwrap().clone();
        assert_eq!(v.len(), 5, "{v:?}");
        // A prompt step and four decode steps; the sequence is gone, its blocks free.
        let load = d.load();
        assert_eq!(
            (load.steps, load.running, load.waiting),
            (5, 0, 0),
            "{load:?}"
        );
        assert_eq!(load.kv_usage, 0.0);
        assert!((0.035..0.5).contains(&v[0]), "first token at {v:?}");
        for w in v.windows(2) {
            let gap = w[1] - w[0];
            assert!((0.018..0.25).contains(&gap), "gap {gap} in {v:?}");
        }
    }

    #[test]
    fn refusals_are_cheap_and_named() {
        let d = device(0.001, 0.0);
        assert_eq!(
            d.check_fits(4000, 200),
            Err(Refusal::TooLong {
                needs: 4200,
                kv_tokens: 4096
            })
        );
        assert!(matches!(
            d.submit(vec![sequence(4000, 200, Times::default())]),
            Err(Refusal::TooLong { .. })
        ));
        let many = (0..MAX_SEQUENCES + 1)
            .map(|_| sequence(1, 1, Times::default()))
            .collect();
        assert_eq!(d.submit(many), Err(Refusal::Busy));
    }

    /// A listener that leaves after its first token.
    struct Leaves(Arc<AtomicUsize>);
    impl Sink for Leaves {
        fn release(&mut self, _: u64) -> bool {
            self.0.fetch_add(1, Ordering::AcqRel);
            false
        }
        fn gone(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_sequence_nobody_listens_to_leaves_and_frees_its_place() {
        let d = device(0.002, 0.0);
        let calls = Arc::new(AtomicUsize::new(0));
        let s = Sequence {
            sink: Box::new(Leaves(calls.clone())),
            ..sequence(8, 100, Times::default())
        };
        d.submit(vec![s]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while d.held.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(calls.load(Ordering::Acquire), 1);
        assert_eq!(d.held.load(Ordering::Acquire), 0);
    }
}
