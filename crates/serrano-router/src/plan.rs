//! Routing decisions: hard rules first (model, the tenant's regions and tiers, health, breaker,
//! capacity), then a strategy orders what is left. The first candidate of a plan gets the
//! request; the rest are its fallbacks, so a retry can never leave the tenant's regions.
//!
//! `H` is whatever the caller needs to reach a backend (the server's HTTP client); this crate
//! only decides.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::breaker::{self, Breaker};
use crate::config::{Backend, Config, Kind, Slo, Strategy};
use crate::latency::Ewma;

/// Live state of one backend, kept across reloads by name.
pub struct BackendState {
    pub name: String,
    in_flight: AtomicU32,
    max_concurrency: AtomicU32,
    live: Mutex<Live>,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// Refusals by the backend (4xx): it is alive, the request was bad.
    pub refused: AtomicU64,
}

struct Live {
    breaker: Breaker,
    failed_checks: u32,
    down: bool,
    last_check: Option<String>,
    ttft_ms: Ewma,
    itl_ms: Ewma,
}

impl BackendState {
    fn new(name: &str, cfg: &Config, spec: &Backend) -> BackendState {
        BackendState {
            name: name.to_string(),
            in_flight: AtomicU32::new(0),
            max_concurrency: AtomicU32::new(spec.max_concurrency),
            live: Mutex::new(Live {
                breaker: Breaker::new(cfg.breaker.clone()),
                failed_checks: 0,
                down: false,
                last_check: None,
                ttft_ms: Ewma::default(),
                itl_ms: Ewma::default(),
            }),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // Plain data: a panic while holding the lock left nothing half-done worth refusing.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn breaker_state(&self) -> breaker::State {
        self.live().breaker.state()
    }

    pub fn is_down(&self) -> bool {
        self.live().down
    }

    /// Why it cannot take a request now, if it cannot.
    fn unavailable(&self, now: Instant) -> Option<&'static str> {
        let live = self.live();
        if live.down {
            Some("down")
        } else if !live.breaker.available(now) {
            Some("breaker open")
        } else if self.in_flight() >= self.max_concurrency.load(Ordering::Relaxed) {
            Some("at its concurrency limit")
        } else {
            None
        }
    }

    /// Takes a concurrency slot and the breaker's permission for one request.
    pub fn begin(self: &Arc<Self>, now: Instant) -> Option<Attempt> {
        let max = self.max_concurrency.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        if !self.live().breaker.begin(now) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Attempt {
            state: self.clone(),
            open: true,
        })
    }

    /// The result of an active health check.
    pub fn health_check(&self, now: Instant, ok: bool, detail: String, failures_to_down: u32) {
        let mut live = self.live();
        if ok {
            live.failed_checks = 0;
            live.down = false;
        } else {
            live.failed_checks = live.failed_checks.saturating_add(1);
            live.down = live.failed_checks >= failures_to_down;
        }
        live.breaker.health(now, ok);
        live.last_check = Some(detail);
    }

    fn p95(&self, now: Instant, stale: Duration) -> (Option<f64>, Option<f64>) {
        let live = self.live();
        (live.ttft_ms.p95(now, stale), live.itl_ms.p95(now, stale))
    }

    fn view(
        &self,
        now: Instant,
        stale: Duration,
    ) -> (String, bool, Option<String>, u64, Option<f64>, Option<f64>) {
        let live = self.live();
        (
            live.breaker.state().as_str().to_string(),
            !live.down,
            live.last_check.clone(),
            live.breaker.opened_count,
            live.ttft_ms.p95(now, stale),
            live.itl_ms.p95(now, stale),
        )
    }
}

/// How an attempt ended, for the breaker and the latency estimates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered; TTFT (for a non-streamed request, the whole response) and, for streams, the
    /// mean gap between tokens.
    Ok { ttft_ms: f64, itl_ms: Option<f64> },
    /// Connect error, timeout, 5xx, broken stream: counts against the breaker.
    Failed,
    /// The backend refused the request itself (4xx): it is alive.
    Refused,
}

/// One request in flight on a backend; dropping it without `finish` frees the slot and says
/// nothing about the backend (the client went away).
pub struct Attempt {
    state: Arc<BackendState>,
    open: bool,
}

impl Attempt {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.state
    }

    pub fn finish(mut self, now: Instant, outcome: Outcome) {
        self.open = false;
        let s = &self.state;
        let mut live = s.live();
        match outcome {
            Outcome::Ok { ttft_ms, itl_ms } => {
                s.succeeded.fetch_add(1, Ordering::Relaxed);
                live.breaker.record(now, true);
                live.ttft_ms.update(now, ttft_ms);
                if let Some(itl) = itl_ms {
                    live.itl_ms.update(now, itl);
                }
            }
            Outcome::Failed => {
                s.failed.fetch_add(1, Ordering::Relaxed);
                live.breaker.record(now, false);
            }
            Outcome::Refused => {
                s.refused.fetch_add(1, Ordering::Relaxed);
                live.breaker.record(now, true);
            }
        }
        drop(live);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.open {
            self.state.live().breaker.abandon();
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One applied config with the live state and handles of its backends.
pub struct Deployment<H> {
    pub version: u64,
    pub config: Arc<Config>,
    /// Aligned with `config.backends`.
    pub states: Vec<Arc<BackendState>>,
    pub handles: Vec<H>,
    /// Smooth weighted round robin's running weights, per route model and backend index.
    swrr: Mutex<HashMap<String, Vec<i64>>>,
    /// Turns for `least-loaded`'s ties, so a burst that finds every backend equally loaded
    /// (nothing has begun yet) is spread round robin instead of all going to the first.
    ties: AtomicU64,
}

/// A backend chosen for a request, with the model id it knows the request's model by.
#[derive(Clone)]
pub struct Candidate<H> {
    pub name: String,
    pub kind: Kind,
    pub model: String,
    pub handle: H,
    pub state: Arc<BackendState>,
    pub index: usize,
}

/// A routing decision: candidates in the order to try them.
pub struct Plan<H> {
    pub version: u64,
    pub strategy: Strategy,
    pub candidates: Vec<Candidate<H>>,
    /// Why the first candidate was chosen, for the audit record and `x-serrano-route`.
    pub reason: String,
    pub config: Arc<Config>,
    /// The tenant's latency targets (its own `slo`, else the route's, else `[routing]`'s):
    /// `cheapest-within-slo` chose by them, and a local engine schedules by them.
    pub slo: Slo,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("no backend serves the model '{0}'")]
    UnknownModel(String),
    #[error("{0}")]
    NoBackend(String),
}

/// What a tenant may use and expects.
#[derive(Debug, Clone)]
struct TenantRules<'a> {
    regions: Option<&'a [String]>,
    tiers: Option<&'a [String]>,
    slo: Slo,
}

pub struct Router<H> {
    states: Mutex<HashMap<String, Arc<BackendState>>>,
    active: RwLock<Arc<Deployment<H>>>,
}

impl<H: Clone> Router<H> {
    pub fn new(version: u64, config: Config, handles: Vec<H>) -> Router<H> {
        let states = Mutex::new(HashMap::new());
        let dep = Self::deployment(&states, version, config, handles);
        Router {
            states,
            active: RwLock::new(Arc::new(dep)),
        }
    }

    fn deployment(
        states: &Mutex<HashMap<String, Arc<BackendState>>>,
        version: u64,
        config: Config,
        handles: Vec<H>,
    ) -> Deployment<H> {
        let mut map = states.lock().unwrap_or_else(|p| p.into_inner());
        let states = config
            .backends
            .iter()
            .map(|b| {
                let s = map
                    .entry(b.name.clone())
                    .or_insert_with(|| Arc::new(BackendState::new(&b.name, &config, b)))
                    .clone();
                s.max_concurrency
                    .store(b.max_concurrency, Ordering::Relaxed);
                s.live().breaker.reconfigure(config.breaker.clone());
                s
            })
            .collect();
        // Backends that left the config are forgotten (their in-flight requests keep their Arc).
        map.retain(|name, _| config.backend(name).is_some());
        Deployment {
            version,
            config: Arc::new(config),
            states,
            handles,
            swrr: Mutex::new(HashMap::new()),
            ties: AtomicU64::new(0),
        }
    }

    /// Switches to a new config; requests already routed finish on the old one. Backends keep
    /// their breaker, health and latency state across the switch when their name stays.
    pub fn install(&self, version: u64, config: Config, handles: Vec<H>) {
        let dep = Arc::new(Self::deployment(&self.states, version, config, handles));
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = dep;
    }

    pub fn active(&self) -> Arc<Deployment<H>> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every model name clients may use, with the backends serving it.
    pub fn models(&self) -> Vec<(String, Vec<String>)> {
        let dep = self.active();
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for b in &dep.config.backends {
            for m in b.client_models() {
                match out.iter_mut().find(|(n, _)| n == m) {
                    Some((_, bs)) => bs.push(b.name.clone()),
                    None => out.push((m.to_string(), vec![b.name.clone()])),
                }
            }
        }
        out
    }

    pub fn plan(&self, model: &str, tenant: &str, now: Instant) -> Result<Plan<H>, RouteError> {
        let dep = self.active();
        dep.plan(model, tenant, now)
    }
}

impl<H: Clone> Deployment<H> {
    fn rules(&self, tenant: &str, route_slo: Option<Slo>) -> TenantRules<'_> {
        let c = &self.config;
        let t = c.tenants.get(tenant);
        TenantRules {
            regions: t
                .and_then(|t| t.regions.as_deref())
                .or(c.routing.regions.as_deref()),
            tiers: t
                .and_then(|t| t.tiers.as_deref())
                .or(c.routing.tiers.as_deref()),
            slo: t.and_then(|t| t.slo).or(route_slo).unwrap_or(c.routing.slo),
        }
    }

    pub fn plan(&self, model: &str, tenant: &str, now: Instant) -> Result<Plan<H>, RouteError> {
        let c = &self.config;
        let route = c.route_for(model);
        // Candidates in priority order: the route's list, else file order.
        let order: Vec<usize> = match route.filter(|r| !r.backends.is_empty()) {
            Some(r) => r
                .backends
                .iter()
                .filter_map(|n| c.backends.iter().position(|b| &b.name == n))
                .collect(),
            None => (0..c.backends.len()).collect(),
        };
        let serving: Vec<usize> = order
            .into_iter()
            .filter(|&i| c.backends[i].serves(model).is_some())
            .collect();
        if serving.is_empty() {
            return Err(RouteError::UnknownModel(model.to_string()));
        }
        let rules = self.rules(tenant, route.and_then(|r| r.slo));
        let allowed =
            |list: Option<&[String]>, v: &str| list.is_none_or(|l| l.iter().any(|x| x == v));
        let permitted: Vec<usize> = serving
            .iter()
            .copied()
            .filter(|&i| {
                allowed(rules.regions, &c.backends[i].region)
                    && allowed(rules.tiers, &c.backends[i].tier)
            })
            .collect();
        if permitted.is_empty() {
            return Err(RouteError::NoBackend(format!(
                "no backend serving '{model}' is in the regions ({}) and tiers ({}) tenant '{tenant}' may use",
                list_or_any(rules.regions),
                list_or_any(rules.tiers)
            )));
        }
        let mut excluded = Vec::new();
        let eligible: Vec<usize> = permitted
            .iter()
            .copied()
            .filter(|&i| match self.states[i].unavailable(now) {
                None => true,
                Some(why) => {
                    excluded.push(format!("{} {why}", c.backends[i].name));
                    false
                }
            })
            .collect();
        if eligible.is_empty() {
            return Err(RouteError::NoBackend(format!(
                "no backend for '{model}' that tenant '{tenant}' may use is available now: {}",
                excluded.join(", ")
            )));
        }
        let strategy = route.and_then(|r| r.strategy).unwrap_or(c.routing.strategy);
        let (ordered, why) = match strategy {
            Strategy::Priority => (
                eligible.clone(),
                format!("first of {} eligible", eligible.len()),
            ),
            Strategy::Weighted => self.weighted(model, route, &eligible),
            Strategy::LeastLoaded => self.least_loaded(&eligible),
            Strategy::CheapestWithinSlo => self.cheapest_within_slo(&eligible, rules.slo, now),
        };
        let first = &c.backends[ordered[0]].name;
        let mut reason = format!("{}: {first} ({why})", strategy.as_str());
        if !excluded.is_empty() {
            reason.push_str(&format!("; skipped {}", excluded.join(", ")));
        }
        let attempts = 1 + c.routing.retries as usize;
        let candidates = ordered
            .into_iter()
            .take(attempts)
            .map(|i| {
                let b = &c.backends[i];
                Candidate {
                    name: b.name.clone(),
                    kind: b.kind,
                    model: b.serves(model).unwrap_or(model).to_string(),
                    handle: self.handles[i].clone(),
                    state: self.states[i].clone(),
                    index: i,
                }
            })
            .collect();
        Ok(Plan {
            version: self.version,
            strategy,
            candidates,
            reason,
            config: self.config.clone(),
            slo: rules.slo,
        })
    }

    /// Smooth weighted round robin over the eligible backends: over any run of requests with the
    /// same eligible set, each backend's share is exactly its weight's (nginx's algorithm).
    fn weighted(
        &self,
        model: &str,
        route: Option<&crate::config::Route>,
        eligible: &[usize],
    ) -> (Vec<usize>, String) {
        let c = &self.config;
        let weight = |i: usize| -> i64 {
            let b = &c.backends[i];
            let w = match route {
                Some(r) if !r.weights.is_empty() => r.weights.get(&b.name).copied().unwrap_or(0),
                _ => b.weight,
            };
            i64::from(w)
        };
        let total: i64 = eligible.iter().map(|&i| weight(i)).sum();
        let mut rest: Vec<usize> = eligible.to_vec();
        if total <= 0 {
            return (
                rest,
                "no eligible backend has a weight; priority order".into(),
            );
        }
        let key = route.map_or(model, |r| r.model.as_str()).to_string();
        let mut swrr = self.swrr.lock().unwrap_or_else(|p| p.into_inner());
        let current = swrr.entry(key).or_insert_with(|| vec![0; c.backends.len()]);
        let mut best = eligible[0];
        for &i in eligible {
            current[i] += weight(i);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        rest.retain(|&i| i != best);
        rest.insert(0, best);
        (rest, format!("weight {} of {total}", weight(best)))
    }

    fn least_loaded(&self, eligible: &[usize]) -> (Vec<usize>, String) {
        let load = |i: usize| {
            let s = &self.states[i];
            f64::from(s.in_flight()) / f64::from(s.max_concurrency.load(Ordering::Relaxed).max(1))
        };
        // Ties are broken round robin: rotate the priority order by a turn counter, then sort
        // stably by load.
        let mut ordered = eligible.to_vec();
        if !ordered.is_empty() {
            let turn = self.ties.fetch_add(1, Ordering::Relaxed) as usize % ordered.len();
            ordered.rotate_left(turn);
        }
        ordered.sort_by(|&a, &b| load(a).total_cmp(&load(b)));
        let s = &self.states[ordered[0]];
        let why = format!(
            "{}/{} in flight",
            s.in_flight(),
            s.max_concurrency.load(Ordering::Relaxed)
        );
        (ordered, why)
    }

    /// Cheapest first among the backends whose p95 estimates meet the SLO (a backend with no
    /// recent sample counts as meeting it, so it gets explored); when none does, fastest first.
    fn cheapest_within_slo(
        &self,
        eligible: &[usize],
        slo: Slo,
        now: Instant,
    ) -> (Vec<usize>, String) {
        let c = &self.config;
        let stale = Duration::from_millis(c.routing.stale_after_ms);
        let price = |i: usize| c.backends[i].price.map_or(0.0, |p| p.input + p.output);
        let est: Vec<(usize, Option<f64>, Option<f64>)> = eligible
            .iter()
            .map(|&i| {
                let (t, l) = self.states[i].p95(now, stale);
                (i, t, l)
            })
            .collect();
        let over = |v: Option<f64>, target: Option<f64>| matches!((v, target), (Some(v), Some(t)) if v > t);
        let meets = |&(_, t, l): &(usize, Option<f64>, Option<f64>)| {
            !over(t, slo.ttft_p95_ms) && !over(l, slo.itl_p95_ms)
        };
        let mut ok: Vec<_> = est.iter().filter(|e| meets(e)).cloned().collect();
        let mut bad: Vec<_> = est.iter().filter(|e| !meets(e)).cloned().collect();
        ok.sort_by(|a, b| price(a.0).total_cmp(&price(b.0)));
        bad.sort_by(|a, b| {
            let key = |e: &(usize, Option<f64>, Option<f64>)| e.1.unwrap_or(0.0);
            key(a).total_cmp(&key(b))
        });
        let fmt = |v: Option<f64>| v.map_or("unknown".to_string(), |v| format!("{v:.0} ms"));
        let why = match (ok.first(), bad.first()) {
            (Some(&(i, t, _)), _) => {
                let cheaper_over: Vec<&str> = bad
                    .iter()
                    .filter(|e| price(e.0) < price(i))
                    .map(|e| c.backends[e.0].name.as_str())
                    .collect();
                let mut w = format!("${:.2}/1M, ttft p95 {} within SLO", price(i), fmt(t));
                if !cheaper_over.is_empty() {
                    w.push_str(&format!("; cheaper {} over SLO", cheaper_over.join(", ")));
                }
                w
            }
            (None, Some(&(_, t, _))) => format!("none meets the SLO; fastest, ttft p95 {}", fmt(t)),
            (None, None) => String::new(),
        };
        let ordered = ok.iter().chain(bad.iter()).map(|e| e.0).collect();
        (ordered, why)
    }

    /// The admin view of every backend.
    pub fn views(&self, now: Instant) -> Vec<BackendView> {
        let stale = Duration::from_millis(self.config.routing.stale_after_ms);
        self.config
            .backends
            .iter()
            .zip(&self.states)
            .map(|(b, s)| {
                let (breaker, healthy, last_check, opened, ttft, itl) = s.view(now, stale);
                BackendView {
                    name: b.name.clone(),
                    kind: b.kind.as_str(),
                    url: b.url.clone(),
                    region: b.region.clone(),
                    tier: b.tier.clone(),
                    models: b.client_models().map(String::from).collect(),
                    price: b.price,
                    breaker,
                    breaker_opened: opened,
                    healthy,
                    last_check,
                    in_flight: s.in_flight(),
                    max_concurrency: b.max_concurrency,
                    ttft_p95_ms: ttft,
                    itl_p95_ms: itl,
                    succeeded: s.succeeded.load(Ordering::Relaxed),
                    failed: s.failed.load(Ordering::Relaxed),
                    refused: s.refused.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

fn list_or_any(l: Option<&[String]>) -> String {
    l.map_or("any".to_string(), |l| l.join(", "))
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub name: String,
    pub kind: &'static str,
    pub url: Option<String>,
    pub region: String,
    pub tier: String,
    pub models: Vec<String>,
    pub price: Option<crate::config::Price>,
    pub breaker: String,
    pub breaker_opened: u64,
    pub healthy: bool,
    pub last_check: Option<String>,
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub ttft_p95_ms: Option<f64>,
    pub itl_p95_ms: Option<f64>,
    pub succeeded: u64,
    pub failed: u64,
    pub refused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(strategy: &str, extra: &str) -> Config {
        let text = format!(
            r#"
[routing]
strategy = "{strategy}"
slo = {{ ttft_p95_ms = 100 }}

[[backend]]
name = "eu-gpu"
url = "http://127.0.0.1:1/v1"
region = "eu"
tier = "gpu"
models = ["m"]
price = {{ input = 1.0, output = 4.0 }}

[[backend]]
name = "eu-cpu"
url = "http://127.0.0.1:2/v1"
region = "eu"
tier = "cpu"
models = ["m"]
price = {{ input = 0.1, output = 0.4 }}
max_concurrency = 2

[[backend]]
name = "us-gpu"
url = "http://127.0.0.1:3/v1"
region = "us"
tier = "gpu"
aliases = {{ m = "m-us" }}
price = {{ input = 0.05, output = 0.2 }}

[tenant.euro]
regions = ["eu"]
{extra}
"#
        );
        Config::parse(&text).unwrap()
    }

    fn router(strategy: &str, extra: &str) -> Router<()> {
        let c = config(strategy, extra);
        let n = c.backends.len();
        Router::new(1, c, vec![(); n])
    }

    fn names(p: &Plan<()>) -> Vec<&str> {
        p.candidates.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn priority_follows_file_order_and_aliases_map_the_model() {
        let r = router("priority", "");
        let p = r.plan("m", "anyone", Instant::now()).unwrap();
        assert_eq!(names(&p), ["eu-gpu", "eu-cpu", "us-gpu"]);
        assert_eq!(p.candidates[2].model, "m-us");
        assert!(p.reason.starts_with("priority: eu-gpu"), "{}", p.reason);
        assert_eq!(
            r.plan("nope", "anyone", Instant::now()).err(),
            Some(RouteError::UnknownModel("nope".into()))
        );
    }

    #[test]
    fn residency_is_never_crossed_even_when_the_region_is_down() {
        let r = router("priority", "");
        let now = Instant::now();
        let p = r.plan("m", "euro", now).unwrap();
        assert_eq!(names(&p), ["eu-gpu", "eu-cpu"]);
        for s in &r.active().states[..2] {
            s.health_check(now, false, "refused".into(), 1);
        }
        let e = r.plan("m", "euro", now).err().unwrap();
        assert!(
            matches!(&e, RouteError::NoBackend(m) if m.contains("eu-gpu down")),
            "{e}"
        );
        assert_eq!(names(&r.plan("m", "other", now).unwrap()), ["us-gpu"]);
    }

    #[test]
    fn weighted_shares_are_exact() {
        let r = router(
            "priority",
            "[[route]]\nmodel = \"m\"\nstrategy = \"weighted\"\nbackends = [\"eu-gpu\", \"us-gpu\"]\nweights = { eu-gpu = 10, us-gpu = 90 }",
        );
        let now = Instant::now();
        let mut eu = 0;
        for _ in 0..1000 {
            let p = r.plan("m", "t", now).unwrap();
            eu += usize::from(p.candidates[0].name == "eu-gpu");
            assert_eq!(p.candidates.len(), 2, "the other is the fallback");
        }
        assert_eq!(eu, 100);
    }

    #[test]
    fn least_loaded_counts_in_flight_against_the_limit() {
        let r = router("least-loaded", "");
        let now = Instant::now();
        let eu_gpu = r.active().states[0].clone();
        let _a = eu_gpu.begin(now).unwrap();
        let p = r.plan("m", "t", now).unwrap();
        let mut idle = names(&p)[..2].to_vec();
        idle.sort();
        assert_eq!(idle, ["eu-cpu", "us-gpu"], "the two idle ones first");
        let eu_cpu = r.active().states[1].clone();
        let _b = eu_cpu.begin(now).unwrap();
        let _c = eu_cpu.begin(now).unwrap();
        assert!(eu_cpu.begin(now).is_none(), "max_concurrency = 2");
        let p = r.plan("m", "euro", now).unwrap();
        assert_eq!(names(&p), ["eu-gpu"], "{}", p.reason);
        assert!(
            p.reason.contains("eu-cpu at its concurrency limit"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn least_loaded_spreads_a_burst_that_finds_every_backend_idle() {
        let r = router("least-loaded", "");
        let now = Instant::now();
        // Plans made before any attempt begins all see equal loads.
        let firsts: Vec<String> = (0..6)
            .map(|_| r.plan("m", "t", now).unwrap().candidates[0].name.clone())
            .collect();
        for b in ["eu-gpu", "eu-cpu", "us-gpu"] {
            assert_eq!(firsts.iter().filter(|f| *f == b).count(), 2, "{firsts:?}");
        }
    }

    #[test]
    fn cheapest_within_slo_spills_over_and_comes_back() {
        let r = router("cheapest-within-slo", "");
        let now = Instant::now();
        let dep = r.active();
        assert_eq!(
            names(&r.plan("m", "euro", now).unwrap()),
            ["eu-cpu", "eu-gpu"]
        );
        for _ in 0..5 {
            dep.states[1].begin(now).unwrap().finish(
                now,
                Outcome::Ok {
                    ttft_ms: 400.0,
                    itl_ms: None,
                },
            );
            dep.states[0].begin(now).unwrap().finish(
                now,
                Outcome::Ok {
                    ttft_ms: 20.0,
                    itl_ms: None,
                },
            );
        }
        let p = r.plan("m", "euro", now).unwrap();
        assert_eq!(names(&p), ["eu-gpu", "eu-cpu"]);
        assert!(p.reason.contains("cheaper eu-cpu over SLO"), "{}", p.reason);
        // Without fresh samples, the cheap one is tried again.
        let later = now + Duration::from_secs(6);
        dep.states[0].begin(later).unwrap().finish(
            later,
            Outcome::Ok {
                ttft_ms: 20.0,
                itl_ms: None,
            },
        );
        assert_eq!(names(&r.plan("m", "euro", later).unwrap())[0], "eu-cpu");
    }

    #[test]
    fn failures_open_the_breaker_and_reloads_keep_it() {
        let r = router("priority", "");
        let now = Instant::now();
        let s = r.active().states[0].clone();
        for _ in 0..4 {
            s.begin(now).unwrap().finish(now, Outcome::Failed);
        }
        assert_eq!(s.breaker_state(), breaker::State::Open);
        assert_eq!(names(&r.plan("m", "t", now).unwrap())[0], "eu-cpu");
        r.install(2, config("priority", ""), vec![(); 3]);
        assert_eq!(r.active().states[0].breaker_state(), breaker::State::Open);
        assert_eq!(r.active().version, 2);
    }

    #[test]
    fn dropped_attempts_free_their_slot() {
        let r = router("priority", "");
        let s = r.active().states[1].clone();
        let a = s.begin(Instant::now()).unwrap();
        assert_eq!(s.in_flight(), 1);
        drop(a);
        assert_eq!(s.in_flight(), 0);
    }

    proptest! {
        /// Whatever the health, breakers, load and strategy, a plan for a tenant restricted to
        /// `eu` holds only `eu` backends.
        #[test]
        fn plans_never_leave_the_tenants_regions(
            strategy in 0usize..4,
            down in proptest::collection::vec(any::<bool>(), 3),
            failures in proptest::collection::vec(0usize..6, 3),
        ) {
            let s = ["priority", "weighted", "least-loaded", "cheapest-within-slo"][strategy];
            let r = router(s, "");
            let now = Instant::now();
            let dep = r.active();
            for i in 0..3 {
                dep.states[i].health_check(now, !down[i], String::new(), 1);
                for _ in 0..failures[i] {
                    if let Some(a) = dep.states[i].begin(now) { a.finish(now, Outcome::Failed) }
                }
            }
            match r.plan("m", "euro", now) {
                Ok(p) => {
                    prop_assert!(!p.candidates.is_empty());
                    for c in &p.candidates {
                        prop_assert_eq!(&dep.config.backends[c.index].region, "eu");
                    }
                }
                Err(e) => prop_assert!(matches!(e, RouteError::NoBackend(_))),
            }
        }
    }
}
