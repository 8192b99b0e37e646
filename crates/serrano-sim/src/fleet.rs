//! A fleet on one virtual clock: the router's own plans (`serrano-router`: the strategy, the
//! residency and tier rules, the concurrency limits and the live latency estimates a gateway
//! uses) send each arriving request to one of several simulated backends, each planning its
//! steps with the engine's scheduler as [`crate::sim::simulate`] does. No second copy of the
//! routing logic: the router is handed the virtual time as its `Instant`s.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serrano_bench::metrics::{RequestRecord, Slo};
use serrano_bench::workload::{TraceEntry, Workload};
use serrano_engine::scheduler::SchedulerConfig;
use serrano_engine::SloClass;
use serrano_router::config::{Class, SimTier, SimTokens};
use serrano_router::{Attempt, Config, Outcome, Router};

use crate::catalog::Catalog;
use crate::profile::Profile;
use crate::roofline::{ModelShape, Precision};
use crate::sim::{
    modelled_energy, run_nodes, run_requests, summarize, Backend, LateBound, Node, Request,
    SimError, SimRun, Timing, TtftTarget,
};
use crate::timeline::Timeline;

/// Most simulated backends in one fleet file (the routing config's own limit).
pub const MAX_FLEET_BACKENDS: usize = serrano_router::config::MAX_BACKENDS;
/// A datacenter device's scheduler unless a fleet file says otherwise: vLLM's default
/// sequences per step, and tokens per step as its chunked prefill sizes them.
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 8192;

/// Backends behind one routing config.
pub struct Fleet {
    /// The routing config as a gateway reads it (`serrano gateway --config`).
    pub config: Config,
    /// The simulated backend of each of `config.backends`, in order.
    pub backends: Vec<Backend>,
    /// The price per hour of each backend (its device's, or the fleet file's `price_per_hour`).
    pub prices: Vec<f64>,
}

/// A backend's `sim` table in a fleet file: what it is simulated on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimSpec {
    /// A catalog device (its roofline for the model).
    #[serde(default)]
    device: Option<String>,
    /// Or a `serrano sim calibrate` profile file (a real server's step-time model), relative
    /// to the fleet file.
    #[serde(default)]
    profile: Option<String>,
    /// Identical backends of this spec (named `NAME-1`..`NAME-N` when more than one).
    #[serde(default = "one")]
    count: usize,
    /// A device's weights and arithmetic (bf16 when not given; a profile has its own).
    #[serde(default)]
    precision: Option<String>,
    /// Step limits: a device's default the datacenter's, a profile's the server's.
    #[serde(default)]
    max_num_seqs: Option<usize>,
    #[serde(default)]
    max_batch_tokens: Option<usize>,
    /// Overrides the device's or profile's price per hour.
    #[serde(default)]
    price_per_hour: Option<f64>,
}

fn one() -> usize {
    1
}

impl SimSpec {
    /// The simulated backend and its price: a catalog device's roofline, or a profile read
    /// from `dir` (the fleet file's folder).
    fn backend(
        &self,
        catalog: &Catalog,
        model: &mut dyn FnMut() -> Result<ModelShape, String>,
        dir: &Path,
    ) -> Result<(Backend, f64), String> {
        let tier = SimTier {
            device: self.device.clone(),
            profile: self.profile.clone(),
            model_shape: None,
            precision: self.precision.clone(),
            max_num_seqs: self.max_num_seqs,
            max_batch_tokens: self.max_batch_tokens,
            tokens: SimTokens::default(),
        };
        let (backend, price) = tier_backend(&tier, catalog, model, dir)?;
        let price = self.price_per_hour.unwrap_or(price);
        if !(price.is_finite() && price >= 0.0) {
            return Err(format!("price_per_hour {price}"));
        }
        Ok((backend, price))
    }
}

/// The simulated backend a sim table describes (a fleet file's, or a server's `kind = "sim"`
/// backend's), and its price per hour: a catalog device (or what-if variant) running the
/// table's `model_shape`, else the shape `model` gives (asked only then), with the
/// datacenter's step limits unless the table sets them; or a `serrano sim calibrate` profile
/// read relative to `dir`, with the server's step limits unless the table sets them.
pub fn tier_backend(
    t: &SimTier,
    catalog: &Catalog,
    model: &mut dyn FnMut() -> Result<ModelShape, String>,
    dir: &Path,
) -> Result<(Backend, f64), String> {
    let limits = |seqs: usize, tokens: usize| SchedulerConfig {
        max_num_seqs: t.max_num_seqs.unwrap_or(seqs).max(1),
        max_batch_tokens: t.max_batch_tokens.unwrap_or(tokens).max(1),
    };
    match (&t.device, &t.profile) {
        (Some(device), None) => {
            let device = catalog.variant(device).map_err(|e| e.to_string())?;
            let precision = match t.precision.as_deref() {
                None => Precision::Bf16,
                Some(p) => Precision::parse(p)
                    .ok_or_else(|| format!("precision '{p}': use bf16 or int8"))?,
            };
            let shape = match &t.model_shape {
                Some(name) => {
                    ModelShape::from_spec(catalog.model(name).map_err(|e| e.to_string())?)
                }
                None => model()?,
            };
            let price = device.price_per_hour;
            let backend = Backend {
                timing: Timing::Roofline {
                    device,
                    model: shape,
                    precision,
                },
                scheduler: limits(DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_BATCH_TOKENS),
            };
            Ok((backend, price))
        }
        (None, Some(file)) => {
            if t.precision.is_some() || t.model_shape.is_some() {
                return Err("a profile has its own model and precision".into());
            }
            let profile = Profile::load(&dir.join(file)).map_err(|e| e.to_string())?;
            let scheduler = limits(profile.max_num_seqs, profile.max_batch_tokens);
            Ok((profile.backend(Some(scheduler)), profile.price_per_hour))
        }
        _ => Err("give one of device or profile".into()),
    }
}

impl Fleet {
    /// A fleet file: a routing config (`[routing]`, `[[backend]]`, `[tenant.*]`, as `serrano
    /// gateway --config` reads it) whose every backend has a `sim` table (`device` or
    /// `profile`, and optionally `count`, `precision`, `max_num_seqs`, `max_batch_tokens`,
    /// `price_per_hour`) instead of a `url`; each device backend runs the shape `model` gives
    /// (asked only when a device backend needs it: a fleet of profiles needs no weights), each
    /// profile (a path relative to `dir`, the fleet file's folder) the model it was calibrated on.
    pub fn parse(
        text: &str,
        catalog: &Catalog,
        model: &mut dyn FnMut() -> Result<ModelShape, String>,
        dir: &Path,
    ) -> Result<Fleet, SimError> {
        let bad = |m: String| SimError::Workload(format!("fleet file: {m}"));
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let declared = match doc.remove("backend") {
            Some(toml::Value::Array(a)) => a,
            _ => return Err(bad("no [[backend]]".into())),
        };
        let (mut expanded, mut backends, mut prices) = (Vec::new(), Vec::new(), Vec::new());
        for b in declared {
            let toml::Value::Table(mut b) = b else {
                return Err(bad("a [[backend]] is not a table".into()));
            };
            let name = b
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let spec: SimSpec = b
                .remove("sim")
                .ok_or_else(|| bad(format!("backend '{name}' has no sim table")))?
                .try_into()
                .map_err(|e| bad(format!("backend '{name}': sim: {e}")))?;
            if spec.count == 0 || expanded.len() + spec.count > MAX_FLEET_BACKENDS {
                return Err(bad(format!(
                    "backend '{name}': count must be 1 or more, at most {MAX_FLEET_BACKENDS} in all"
                )));
            }
            let (backend, price) = spec
                .backend(catalog, model, dir)
                .map_err(|e| bad(format!("backend '{name}': {e}")))?;
            // The router needs an address for a remote backend; a simulated one has none.
            b.insert("url".into(), "http://sim.invalid/v1".into());
            for i in 1..=spec.count {
                let mut copy = b.clone();
                if spec.count > 1 {
                    copy.insert("name".into(), format!("{name}-{i}").into());
                }
                expanded.push(toml::Value::Table(copy));
                backends.push(backend.clone());
                prices.push(price);
            }
        }
        doc.insert("backend".into(), toml::Value::Array(expanded));
        let routing = toml::to_string(&doc).map_err(|e| bad(e.to_string()))?;
        let config = Config::parse(&routing).map_err(|e| bad(e.to_string()))?;
        Ok(Fleet {
            config,
            backends,
            prices,
        })
    }

    /// The model requests ask for: the first model the first backend serves.
    pub fn model(&self) -> Option<&str> {
        let b = self.config.backends.first()?;
        b.models
            .first()
            .or_else(|| b.aliases.keys().next())
            .map(String::as_str)
    }

    /// The whole fleet's price per hour.
    pub fn price_per_hour(&self) -> f64 {
        self.prices.iter().sum()
    }
}

/// A fleet's simulated run.
#[derive(Debug)]
pub struct FleetRun {
    /// One per request, in request order; a request the router could place nowhere has its
    /// error, as the gateway would answer it.
    pub records: Vec<RequestRecord>,
    /// The backend each request was sent to.
    pub backend_of: Vec<Option<usize>>,
    /// What each backend was doing over the run.
    pub timeline: Timeline,
}

/// Runs `reqs` (asking for `model`) through the fleet. Deterministic: ties between backends'
/// step ends go to the lower index, and the router's own tie-breaking is deterministic. With a
/// `late` bound, stops with [`SimError::Late`] once it is passed.
pub fn simulate_fleet(
    f: &Fleet,
    model: &str,
    reqs: &[Request],
    late: Option<LateBound>,
) -> Result<FleetRun, SimError> {
    if f.backends.len() != f.config.backends.len() {
        return Err(SimError::Workload(format!(
            "the fleet simulates {} backends but its routing config names {}",
            f.backends.len(),
            f.config.backends.len()
        )));
    }
    let router = Router::new(1, f.config.clone(), (0..f.backends.len()).collect());
    let mut nodes = f
        .backends
        .iter()
        .map(Node::new)
        .collect::<Result<Vec<_>, _>>()?;
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t.max(0.0));
    let run = run_nodes(
        &mut nodes,
        reqs,
        late,
        |r, t, nodes| route(&router, model, r, at(t), nodes),
        |attempt: Attempt, t, record| attempt.finish(at(t), outcome(record)),
    )?;
    Ok(FleetRun {
        records: run.records,
        backend_of: run.node_of,
        timeline: run.timeline,
    })
}

/// A whole simulated run of a workload on the fleet, summarized as `serrano bench` summarizes
/// a measured one, with the requests each backend took. `late` (a TTFT target) ends a run
/// early with [`SimError::Late`] once more first tokens are late than its percentile allows.
pub fn run(
    f: &Fleet,
    w: &Workload,
    trace: Option<&[TraceEntry]>,
    slo: Option<&Slo>,
    name: &str,
    late: Option<TtftTarget>,
) -> Result<SimRun, SimError> {
    let model = f
        .model()
        .ok_or_else(|| SimError::Workload("fleet file: the first backend serves no model".into()))?
        .to_string();
    let (mut reqs, warmup) = run_requests(w, trace)?;
    classify(&mut reqs, &f.config);
    let late = late.map(|t| LateBound::for_target(t, warmup, reqs.len()));
    let run = simulate_fleet(f, &model, &reqs, late)?;
    let mut taken = vec![0usize; f.backends.len()];
    for k in run.backend_of.iter().skip(warmup).flatten() {
        taken[*k] += 1;
    }
    let strategy = f.config.routing.strategy.as_str();
    let url = format!("sim://fleet/{strategy}/{}", f.backends.len());
    let mut result = summarize(w, run.records, warmup, slo, name, url)?;
    let watts = f.backends.iter().map(|b| b.timing.power_w()).sum();
    result.energy = modelled_energy(watts, &result.summary);
    Ok(SimRun {
        result,
        taken,
        timeline: run.timeline,
    })
}

/// Each request's latency class in the engines' schedulers: its tenant's in the fleet file
/// (`[tenant.NAME] class = "batch"`), as a serrano server takes it from its routing config;
/// interactive otherwise.
pub fn classify(reqs: &mut [Request], config: &Config) {
    for r in reqs {
        let class = r
            .tenant
            .as_deref()
            .and_then(|t| config.tenants.get(t))
            .and_then(|t| t.class);
        r.class = match class {
            Some(Class::Batch) => SloClass::Batch,
            Some(Class::Interactive) | None => SloClass::Interactive,
        };
    }
}

/// The router's plan for one request, and the first candidate that takes it: one whose KV
/// cache can hold it and that has a free concurrency slot (as the gateway tries candidates in
/// the plan's order). Otherwise the error the client would see.
fn route(
    router: &Router<usize>,
    model: &str,
    r: &Request,
    now: Instant,
    nodes: &[Node<'_>],
) -> Result<(usize, Attempt), String> {
    let plan = router
        .plan(model, r.tenant.as_deref().unwrap_or(""), now)
        .map_err(|e| e.to_string())?;
    for c in plan.candidates.iter().filter(|c| nodes[c.handle].fits(r)) {
        if let Some(a) = c.state.begin(now) {
            return Ok((c.handle, a));
        }
    }
    Err(format!(
        "no backend could take the request: every candidate was full or too small ({})",
        plan.reason
    ))
}

/// What the gateway reports to the router when a stream ends: its TTFT and mean token gap.
fn outcome(r: &RequestRecord) -> Outcome {
    let first = r.chunks.first().copied().unwrap_or(r.end);
    let gaps = r.chunks.len().saturating_sub(1);
    Outcome::Ok {
        ttft_ms: (first - r.sent) * 1000.0,
        itl_ms: (gaps > 0).then(|| (r.end - first) * 1000.0 / gaps as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::simulate;
    use crate::sim::tests::{backend, req, toy_model};

    /// A routing config of `n` backends serving model `m` with the strategy and each
    /// backend's concurrency limit.
    fn fleet(strategy: &str, limits: &[u32]) -> Fleet {
        let mut text = format!("[routing]\nstrategy = \"{strategy}\"\n");
        for (k, limit) in limits.iter().enumerate() {
            text += &format!(
                "\n[[backend]]\nname = \"b{k}\"\nurl = \"http://127.0.0.1:{}/v1\"\nregion = \"eu\"\n\
                 tier = \"gpu\"\nmodels = [\"m\"]\nmax_concurrency = {limit}\n",
                k + 1
            );
        }
        Fleet {
            config: Config::parse(&text).unwrap(),
            backends: limits.iter().map(|_| backend(8)).collect(),
            prices: vec![1.0; limits.len()],
        }
    }

    fn counts(run: &FleetRun, n: usize) -> Vec<usize> {
        (0..n)
            .map(|k| run.backend_of.iter().filter(|b| **b == Some(k)).count())
            .collect()
    }

    /// A burst over two idle backends is split by least-loaded, and each half runs exactly
    /// as two requests on one backend alone do.
    #[test]
    fn least_loaded_splits_a_burst_and_each_backend_runs_as_alone() {
        let reqs: Vec<Request> = (0..4).map(|_| req(0.0, 100, 10)).collect();
        let run = simulate_fleet(&fleet("least-loaded", &[64, 64]), "m", &reqs, None).unwrap();
        assert_eq!(counts(&run, 2), [2, 2]);
        let (alone, _) = simulate(&backend(8), &reqs[..2]).unwrap();
        for r in &run.records {
            assert!(r.error.is_none());
            assert_eq!(r.chunks, alone[0].chunks);
        }
    }

    /// Priority fills the first backend to its limit, spills to the next, returns to the
    /// first once a slot frees, and a request nobody can take gets the gateway's error.
    #[test]
    fn priority_spills_at_the_concurrency_limit_and_comes_back() {
        let f = fleet("priority", &[1, 1]);
        let reqs = [
            req(0.0, 100, 10),
            req(0.0, 100, 10),
            req(0.0, 100, 10),
            req(1.0, 100, 10),
        ];
        let run = simulate_fleet(&f, "m", &reqs, None).unwrap();
        assert_eq!(run.backend_of, [Some(0), Some(1), None, Some(0)]);
        let refused = run.records[2].error.as_deref().unwrap_or("");
        assert!(refused.contains("at its concurrency limit"), "{refused}");
        assert_eq!(run.records[3].chunks.len(), 10);
    }

    const FILE: &str = r#"
[routing]
strategy = "least-loaded"

[[backend]]
name = "gpu"
region = "eu"
tier = "gpu"
models = ["m"]
sim = { device = "h100-sxm", count = 2, price_per_hour = 3.5 }

[[backend]]
name = "small"
region = "eu"
tier = "gpu"
models = ["m"]
max_concurrency = 8
sim = { device = "l4", precision = "int8", max_num_seqs = 16 }
"#;

    /// A fleet file is a routing config whose backends say what they run on: counts expand
    /// into named copies, prices and step limits come through, and the router reads the rest.
    #[test]
    fn a_fleet_file_expands_counts_into_routed_backends() {
        let catalog = Catalog::builtin().unwrap();
        let f = Fleet::parse(FILE, &catalog, &mut || Ok(toy_model()), Path::new(".")).unwrap();
        let names: Vec<&str> = f.config.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["gpu-1", "gpu-2", "small"]);
        assert_eq!(f.config.routing.strategy.as_str(), "least-loaded");
        assert_eq!(f.config.backends[2].max_concurrency, 8);
        let l4 = catalog.device("l4").unwrap().price_per_hour;
        assert!((f.price_per_hour() - (7.0 + l4)).abs() < 1e-9);
        assert_eq!(f.backends[2].scheduler.max_num_seqs, 16);
        assert!(matches!(
            &f.backends[2].timing,
            Timing::Roofline { device, precision: Precision::Int8, .. } if device.name == "l4"
        ));
        assert_eq!(f.model(), Some("m"));
    }

    #[test]
    fn a_fleet_file_without_what_it_needs_is_refused_with_the_reason() {
        let catalog = Catalog::builtin().unwrap();
        for (broken, why) in [
            (
                FILE.replace(
                    "sim = { device = \"h100-sxm\", count = 2, price_per_hour = 3.5 }",
                    "",
                ),
                "no sim table",
            ),
            (FILE.replace("\"l4\"", "\"tpu-9\""), "tpu-9"),
            (FILE.replace("count = 2", "count = 0"), "count"),
            (
                FILE.replace("max_num_seqs = 16", "max_seqs = 16"),
                "max_seqs",
            ),
            (FILE.replace("\"int8\"", "\"fp4\""), "fp4"),
            (FILE.replace("least-loaded", "fastest"), "fastest"),
            (
                FILE.replace("device = \"l4\"", "device = \"l4\", profile = \"p.toml\""),
                "one of device or profile",
            ),
            (
                FILE.replace(
                    "device = \"l4\", precision = \"int8\",",
                    "profile = \"absent.toml\",",
                ),
                "absent.toml",
            ),
        ] {
            let e = Fleet::parse(&broken, &catalog, &mut || Ok(toy_model()), Path::new("."))
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(why)),
                "{why}: {e:?}"
            );
        }
    }

    /// A backend may be a real server's calibrated profile (a path relative to the fleet
    /// file): its step model, KV size, limits and price, unless the sim table overrides them.
    #[test]
    fn a_fleet_backend_may_be_a_calibrated_profile() {
        let dir = tempfile::tempdir().unwrap();
        let profile = crate::profile::Profile {
            name: "node".into(),
            intercept_s: 0.002,
            prefill_token_s: 0.0006,
            decode_seq_s: 0.001,
            kv_kilotoken_s: 0.0006,
            kv_tokens: 4096,
            max_num_seqs: 32,
            max_batch_tokens: 256,
            price_per_hour: 0.05,
        };
        std::fs::write(dir.path().join("node.toml"), profile.to_file().unwrap()).unwrap();
        let file = FILE.replace(
            "device = \"l4\", precision = \"int8\", max_num_seqs = 16",
            "profile = \"node.toml\", count = 2, max_num_seqs = 16",
        );
        let catalog = Catalog::builtin().unwrap();
        let f = Fleet::parse(&file, &catalog, &mut || Ok(toy_model()), dir.path()).unwrap();
        assert_eq!(f.backends.len(), 4);
        for b in &f.backends[2..] {
            assert!(matches!(
                b.timing,
                Timing::Calibrated {
                    kv_tokens: 4096,
                    ..
                }
            ));
            assert_eq!(b.scheduler.max_num_seqs, 16);
            assert_eq!(b.scheduler.max_batch_tokens, 256);
        }
        assert!((f.price_per_hour() - (7.0 + 0.1)).abs() < 1e-9);
        // A fleet of profiles only never asks for a model's shape (no weights needed).
        let profiles_only = "[routing]\nstrategy = \"least-loaded\"\n\n[[backend]]\n\
             name = \"node\"\nregion = \"eu\"\ntier = \"cpu\"\nmodels = [\"m\"]\n\
             sim = { profile = \"node.toml\" }\n";
        let mut no_model = || Err("no model here".to_string());
        let f = Fleet::parse(profiles_only, &catalog, &mut no_model, dir.path()).unwrap();
        assert_eq!(f.backends.len(), 1);
        let e = Fleet::parse(FILE, &catalog, &mut no_model, dir.path()).err();
        assert!(e.is_some_and(|e| e.to_string().contains("no model here")));
    }

    /// A fleet file's batch tenant is scheduled as a serrano server schedules one: with every
    /// slot taken, half of them by the interactive tenant itself (so fairness takes no slot
    /// for it), a new interactive request takes a batch sequence's slot instead of waiting
    /// for one to finish.
    #[test]
    fn a_batch_tenant_of_the_fleet_file_yields_to_interactive_requests() {
        let of = |tenant: &str, r: Request| Request {
            tenant: Some(tenant.into()),
            ..r
        };
        let mut reqs = vec![
            of("web", req(0.0, 16, 100)),
            of("web", req(0.0, 16, 100)),
            of("evals", req(0.0, 256, 100)),
            of("evals", req(0.0, 256, 100)),
        ];
        reqs.extend((0..4).map(|_| of("evals", req(0.01, 256, 100))));
        reqs.push(of("web", req(0.02, 16, 5)));
        let mut f = fleet("least-loaded", &[64]);
        f.backends[0].scheduler.max_num_seqs = 4;
        let web_ttft = |f: &Fleet, reqs: &mut Vec<Request>| {
            classify(reqs, &f.config);
            let run = simulate_fleet(f, "m", reqs, None).unwrap();
            assert!(run.records.iter().all(|r| r.error.is_none()));
            run.records[8].ttft().unwrap()
        };
        let fifo = web_ttft(&f, &mut reqs);
        assert!(reqs.iter().all(|r| r.class == SloClass::Interactive));
        let batch = serrano_router::config::Tenant {
            class: Some(Class::Batch),
            ..Default::default()
        };
        f.config.tenants.insert("evals".into(), batch);
        let yielded = web_ttft(&f, &mut reqs);
        assert_eq!(reqs[2].class, SloClass::Batch);
        assert_eq!(reqs[8].class, SloClass::Interactive);
        // Waiting for a slot: until the first 100-token sequence ends (2 ms steps), ~0.18 s;
        // taking a batch sequence's, the next step.
        assert!(fifo > 0.15, "{fifo}");
        assert!(yielded < 0.01, "{yielded} vs {fifo}");
    }

    /// An unknown model is the router's own error, and a fleet whose backends do not match
    /// its config is refused.
    #[test]
    fn what_the_router_refuses_and_a_mismatched_fleet() {
        let run =
            simulate_fleet(&fleet("priority", &[4]), "other", &[req(0.0, 8, 2)], None).unwrap();
        let e = run.records[0].error.as_deref().unwrap_or("");
        assert!(e.contains("no backend serves the model 'other'"), "{e}");
        let mut f = fleet("priority", &[4, 4]);
        f.backends.pop();
        assert!(simulate_fleet(&f, "m", &[], None).is_err());
    }
}
