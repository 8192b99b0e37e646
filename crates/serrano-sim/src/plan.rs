//! `serrano plan`: the cheapest fleet that serves a traffic forecast within every tenant's
//! SLO, found by simulating candidate fleets ([`crate::fleet`]: the engine's scheduler on every
//! backend, the router's least-loaded strategy in front) at the forecast's peak rate times a
//! burst headroom. Beside the answer: the frontier of cost against headroom, what
//! over-provisioning costs (utilization against dollars per 1M output tokens), and which spec
//! change of the chosen device moves its cost per token most.
//!
//! Counts are searched, not derived from a throughput ceiling: a fleet meets the SLO when its
//! simulated run at the rate does (`serrano bench`'s own judgement, tenants' SLOs included).
//! The search assumes more backends never make the SLO worse, which holds for least-loaded
//! routing over identical backends up to the simulation's determinism (the same arrivals at
//! every count, from the workload's seed).

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use rayon::prelude::*;
use serrano_bench::metrics::{Slo, Summary};
use serrano_bench::sweep::{at_load, search};
use serrano_bench::workload::Workload;
use serrano_bench::BenchError;
use serrano_router::Config;

use crate::catalog::Device;
use crate::fleet::{self, Fleet, MAX_FLEET_BACKENDS};
use crate::roofline::Precision;
use crate::sim::{Backend, SimError, Timing, TtftTarget};

/// Most requests one simulated point runs (a rate times the forecast's duration is capped
/// here: about 3 s of this machine's time).
pub const MAX_REQUESTS: u64 = 50_000;
/// Headrooms the frontier always reports (the one asked for is added).
pub const FRONTIER: [f64; 5] = [1.0, 1.25, 1.5, 2.0, 3.0];
/// Bisections of a capacity search after its doublings: the rate is found within 2^-8 of
/// the bracket (about 0.4%).
const CAPACITY_BISECTIONS: u32 = 8;
/// Device types whose pairs are tried as mixed fleets (the cheapest alone).
const MIX_TYPES: usize = 3;
/// Counts of the first type tried in each pair.
const MIX_STEPS: usize = 8;
/// How much better each figure gets in the sensitivity ranking.
const SENSITIVITY_STEP: f64 = 0.25;

/// A backend type the plan may buy.
#[derive(Debug, Clone)]
pub struct Offer {
    pub name: String,
    pub backend: Backend,
    pub price_per_hour: f64,
}

/// What to plan for.
#[derive(Debug, Clone, Copy)]
pub struct Forecast<'a> {
    /// The traffic's shape (lengths, tenants with their SLOs, arrival process, seed); its
    /// arrival rate is replaced by `rate`.
    pub workload: &'a Workload,
    /// The SLO every request is judged by (a tenant's own replaces it for that tenant).
    pub slo: Option<&'a Slo>,
    /// Peak requests per second.
    pub rate: f64,
    /// Plan for `rate * headroom` (1.5: a burst half again above the peak is still served).
    pub headroom: f64,
    /// Seconds of traffic each simulated point runs: its requests are the rate times this
    /// (at least the workload's `requests`, at most [`MAX_REQUESTS`]), so a point is a steady
    /// state, not one burst that a big device swallows whole.
    pub duration_s: f64,
    /// Most backends of one type.
    pub max_count: usize,
    /// Each hour's rate as a fraction of `rate` (a diurnal curve, each 0 to 1, 0 an idle
    /// hour); the plan adds what a fixed fleet and an hourly-resized one cost over it.
    pub diurnal: Option<&'a [f64]>,
}

impl Forecast<'_> {
    /// The workload at `rate`, with as many requests as the duration holds.
    pub fn at(&self, rate: f64) -> Workload {
        let mut w = at_load(self.workload, rate);
        let n = (rate * self.duration_s).ceil();
        w.requests =
            (n.min(MAX_REQUESTS as f64) as u64).max(self.workload.requests.min(MAX_REQUESTS));
        w.duration_s = None;
        w
    }
}

/// A fleet: how many backends of each offer.
#[derive(Debug, Clone)]
pub struct Choice {
    /// (offer index, count), counts above zero.
    pub mix: Vec<(usize, usize)>,
    pub price_per_hour: f64,
    /// At the forecast's peak rate (not the headroom's): what a million output tokens cost.
    pub usd_per_1m_output_tokens: f64,
    /// The run that met the SLO, at `rate * headroom`.
    pub summary: Summary,
}

/// How one spec change moves the cost per 1M output tokens of a device run at its capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensitivity {
    /// What changed: `memory_gbs x1.25`.
    pub change: String,
    pub usd_per_1m_output_tokens: f64,
    /// Relative to the device as it is (negative: cheaper).
    pub change_pct: f64,
}

/// One row of the over-provisioning table: a fleet of `count` of the chosen type at the
/// forecast's peak rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioning {
    pub count: usize,
    /// Peak rate over the fleet's capacity (each backend's SLO capacity times the count).
    pub utilization: f64,
    pub usd_per_1m_output_tokens: f64,
}

/// A day of a diurnal forecast on the cheapest type: a fleet fixed at the peak's size against
/// one resized every hour to that hour's rate (times the same headroom), as tight
/// autoscaling would.
#[derive(Debug, Clone, PartialEq)]
pub struct Day {
    pub offer: usize,
    /// Each hour's rate, requests/s.
    pub rates: Vec<f64>,
    /// Backends each hour when resized hourly (0 when the hour has no traffic).
    pub counts: Vec<usize>,
    /// The fixed fleet's size (the peak's).
    pub fixed_count: usize,
    pub fixed_usd: f64,
    pub autoscaled_usd: f64,
    pub output_tokens: f64,
    /// The fixed fleet's mean utilization over the hours (each hour's rate over the fleet's
    /// SLO capacity).
    pub fixed_utilization: Option<f64>,
}

impl Day {
    /// The day's output tokens, at `per_request` a request.
    fn finish(mut self, per_request: f64) -> Day {
        self.output_tokens = self.rates.iter().map(|r| r * per_request * 3600.0).sum();
        self
    }

    pub fn fixed_usd_per_1m(&self) -> f64 {
        self.fixed_usd / self.output_tokens * 1e6
    }
    pub fn autoscaled_usd_per_1m(&self) -> f64 {
        self.autoscaled_usd / self.output_tokens * 1e6
    }
}

/// Most hours a diurnal curve may have (a week).
pub const MAX_HOURS: usize = 168;

/// A plan's answer.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Output tokens per request in the forecast (its mean, as simulated).
    pub output_tokens_per_request: f64,
    /// Per offer: its cheapest fleet alone, or why there is none.
    pub single: Vec<Result<Choice, String>>,
    /// The cheapest fleet mixing two types, when it is cheaper than every single type.
    pub mixed: Option<Choice>,
    /// Per headroom: each offer's cheapest fleet alone (`None`: none within the count).
    pub frontier: Vec<(f64, Vec<Option<Choice>>)>,
    /// Per offer: the highest rate one backend serves within the SLO.
    pub capacity: Vec<Option<f64>>,
    /// The cheapest single type's over-provisioning, from its fleet's count to twice it.
    pub provisioning: Vec<Provisioning>,
    /// Spec changes of the cheapest single type, the most cost-reducing first.
    pub sensitivity: Vec<Sensitivity>,
    /// With a diurnal curve: its day on the cheapest single type.
    pub day: Option<Day>,
}

impl Plan {
    /// The answer: the cheapest fleet, mixed or not.
    pub fn best(&self) -> Option<&Choice> {
        self.mixed
            .as_ref()
            .or_else(|| self.cheapest_single().map(|(_, c)| c))
    }

    /// The cheapest single-type fleet and its offer.
    pub fn cheapest_single(&self) -> Option<(usize, &Choice)> {
        self.single
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref().ok()?)))
            .min_by(|a, b| a.1.price_per_hour.total_cmp(&b.1.price_per_hour))
    }
}

/// The cheapest fleets for a forecast, with the frontier, over-provisioning and sensitivity.
pub fn plan(offers: &[Offer], f: &Forecast) -> Result<Plan, SimError> {
    check(offers, f)?;
    let mut headrooms: Vec<f64> = FRONTIER.iter().copied().chain([f.headroom]).collect();
    headrooms.sort_by(f64::total_cmp);
    headrooms.dedup();
    let columns = columns(offers, f, &headrooms)?;
    // The asked headroom is one of `headrooms` by construction.
    let asked = headrooms
        .iter()
        .position(|h| *h == f.headroom)
        .unwrap_or_default();
    let single: Vec<Result<Choice, String>> = columns.iter().map(|c| c[asked].clone()).collect();
    let frontier = headrooms
        .iter()
        .enumerate()
        .map(|(k, h)| {
            (
                *h,
                columns
                    .iter()
                    .map(|c| c[k].as_ref().ok().cloned())
                    .collect(),
            )
        })
        .collect();
    let output_tokens_per_request = output_per_request(&single)?;
    let mixed = cheapest_mix(offers, &single, f, f.rate * f.headroom)?;
    // One backend's capacity: searched from the load each backend of the lowest headroom's
    // fleet carries, near the answer.
    let capacity = columns
        .par_iter()
        .enumerate()
        .map(|(i, column)| match &column[0] {
            Ok(c) => capacity(
                &[(&offers[i], 1)],
                f,
                f.rate * headrooms[0] / c.mix[0].1 as f64,
            ),
            Err(_) => Ok(None),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Plan {
        output_tokens_per_request,
        single,
        mixed,
        frontier,
        capacity,
        provisioning: Vec::new(),
        sensitivity: Vec::new(),
        day: None,
    };
    if let Some((i, choice)) = out.cheapest_single() {
        let count = choice.mix[0].1;
        if let Some(c1) = out.capacity[i] {
            out.provisioning =
                provisioning(&offers[i], count, c1, f.rate, output_tokens_per_request);
            out.sensitivity = sensitivity(&offers[i], f, c1, output_tokens_per_request)?;
        }
        if let Some(curve) = f.diurnal {
            let d = day(offers, i, count, out.capacity[i], curve, f)?;
            out.day = Some(d.finish(output_tokens_per_request));
        }
    }
    Ok(out)
}

/// Each offer's column of the frontier: its cheapest fleet alone at each headroom, lowest
/// first. A higher rate never needs fewer backends, so each search starts above the last
/// answer (the first search, at the lowest rate, pays for the overloaded small fleets once).
/// Offers are independent: their columns run in parallel (rayon keeps their order).
fn columns(
    offers: &[Offer],
    f: &Forecast,
    headrooms: &[f64],
) -> Result<Vec<Vec<Result<Choice, String>>>, SimError> {
    (0..offers.len())
        .into_par_iter()
        .map(|i| {
            let mut column: Vec<Result<Choice, String>> = Vec::new();
            let mut below = 0;
            for &h in headrooms {
                let c = match column.last() {
                    Some(Err(why)) => Err(String::clone(why)),
                    _ => cheapest_alone(offers, i, f, f.rate * h, below)?,
                };
                if let Ok(c) = &c {
                    below = c.mix[0].1 - 1;
                }
                column.push(c);
            }
            Ok(column)
        })
        .collect()
}

/// The day of `curve` on offer `i`: the fixed fleet of `peak_count` every hour, against the
/// fewest backends meeting the SLO at each hour's rate times the headroom (the token totals
/// are added by [`Day::finish`]).
fn day(
    offers: &[Offer],
    i: usize,
    peak_count: usize,
    capacity_one: Option<f64>,
    curve: &[f64],
    f: &Forecast,
) -> Result<Day, SimError> {
    let price = offers[i].price_per_hour;
    let rates: Vec<f64> = curve.iter().map(|c| c * f.rate).collect();
    let mut distinct: Vec<f64> = rates.iter().copied().filter(|r| *r > 0.0).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    // Lowest rate first: each hour needs at least the count of a quieter hour, and at most the
    // peak's (which meets the peak), so every search is a bisection between the two.
    let mut known: Vec<(f64, usize)> = Vec::new();
    let mut below = 0;
    for r in distinct {
        let n = least(below, Some(peak_count), peak_count, |n| {
            Ok(met(&trial(&[(&offers[i], n)], f, r * f.headroom)?))
        })?
        .unwrap_or(peak_count);
        below = n - 1;
        known.push((r, n));
    }
    let counts: Vec<usize> = rates
        .iter()
        .map(|r| known.iter().find(|(k, _)| k == r).map_or(0, |(_, n)| *n))
        .collect();
    let hours = rates.len() as f64;
    Ok(Day {
        offer: i,
        fixed_count: peak_count,
        fixed_usd: price * peak_count as f64 * hours,
        autoscaled_usd: price * counts.iter().sum::<usize>() as f64,
        output_tokens: 0.0,
        fixed_utilization: capacity_one.map(|c| {
            rates
                .iter()
                .map(|r| r / (c * peak_count as f64))
                .sum::<f64>()
                / hours
        }),
        rates,
        counts,
    })
}

fn check(offers: &[Offer], f: &Forecast) -> Result<(), SimError> {
    let bad = |m: &str| Err(SimError::Workload(m.to_string()));
    if offers.is_empty() {
        return bad("a plan needs at least one device to choose from");
    }
    if f.slo.is_none() && f.workload.tenants.iter().all(|t| t.slo.is_none()) {
        return bad("a plan needs an SLO (--slo, or a tenant's own slo in the workload)");
    }
    if !f.workload.arrival.is_open() {
        return bad("a plan needs an open-loop workload (a rate, not a closed loop)");
    }
    if !(f.rate.is_finite() && f.rate > 0.0 && f.rate <= 1e6) {
        return bad("the peak rate is above 0 and at most 1e6 requests/s");
    }
    if !(f.headroom.is_finite() && (1.0..=100.0).contains(&f.headroom)) {
        return bad("the headroom is a factor from 1 to 100");
    }
    if !(f.duration_s.is_finite() && (1.0..=86_400.0).contains(&f.duration_s)) {
        return bad("the simulated duration is 1 s to a day");
    }
    if !(1..=MAX_FLEET_BACKENDS).contains(&f.max_count) {
        return bad("the most backends of one type is 1 to 256 (the router's limit)");
    }
    if let Some(curve) = f.diurnal {
        let in_range = curve
            .iter()
            .all(|c| c.is_finite() && (0.0..=1.0).contains(c));
        if curve.is_empty()
            || curve.len() > MAX_HOURS
            || !in_range
            || curve.iter().all(|c| *c == 0.0)
        {
            return bad("a diurnal curve is 1 to 168 hourly fractions of the peak rate, each 0 to 1, not all 0");
        }
    }
    Ok(())
}

/// The mean output tokens of a request, from any fleet that met the SLO.
fn output_per_request(single: &[Result<Choice, String>]) -> Result<f64, SimError> {
    let s = single
        .iter()
        .find_map(|c| c.as_ref().ok())
        .map(|c| &c.summary)
        .ok_or_else(|| {
            let why: Vec<&str> = single
                .iter()
                .filter_map(|c| c.as_ref().err().map(String::as_str))
                .collect();
            SimError::Workload(format!("no device meets the SLO: {}", why.join("; ")))
        })?;
    Ok(s.total_output_tokens as f64 / s.completed.max(1) as f64)
}

/// The fewest backends of offer `i` meeting the SLO at `rate`, or why none do; every count up
/// to `below` is known to miss it.
fn cheapest_alone(
    offers: &[Offer],
    i: usize,
    f: &Forecast,
    rate: f64,
    below: usize,
) -> Result<Result<Choice, String>, SimError> {
    let mut runs = Vec::new();
    let found = least(below, None, f.max_count, |n| {
        let s = trial(&[(&offers[i], n)], f, rate)?;
        let ok = met(&s);
        runs.push((n, s));
        Ok(ok)
    });
    let n = match found {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Ok(Err(format!(
                "more than {} needed at {rate:.3} requests/s",
                f.max_count
            )))
        }
        Err(e @ (SimError::DoesNotFit { .. } | SimError::TooLong(_))) => {
            return Ok(Err(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    let summary = runs
        .into_iter()
        .find(|(k, _)| *k == n)
        .and_then(|(_, s)| s)
        .ok_or_else(not_deterministic)?;
    Ok(Ok(choice(offers, vec![(i, n)], summary, f.rate)))
}

/// A count the search accepted has no passing run: the simulation gave two answers.
fn not_deterministic() -> SimError {
    SimError::Workload(
        "a fleet met the SLO once and not again: the simulation is not deterministic".into(),
    )
}

fn choice(offers: &[Offer], mix: Vec<(usize, usize)>, summary: Summary, rate: f64) -> Choice {
    let price: f64 = mix
        .iter()
        .map(|&(i, n)| offers[i].price_per_hour * n as f64)
        .sum();
    let out_per_request = summary.total_output_tokens as f64 / summary.completed.max(1) as f64;
    Choice {
        mix,
        price_per_hour: price,
        usd_per_1m_output_tokens: usd_per_1m(price, rate * out_per_request),
        summary,
    }
}

/// Dollars per 1M output tokens of capacity costing `price` an hour producing `tokens_s`.
fn usd_per_1m(price: f64, tokens_s: f64) -> f64 {
    price / (tokens_s * 3600.0) * 1e6
}

/// The smallest `n` in `below + 1..=max` for which `ok` holds, given that it fails for every
/// count up to `below` and, once it holds, holds for every larger count; `passes` is a count
/// already known to hold. Doubling from `below + 1` (unless `passes` bounds it), then
/// bisecting.
fn least(
    below: usize,
    passes: Option<usize>,
    max: usize,
    mut ok: impl FnMut(usize) -> Result<bool, SimError>,
) -> Result<Option<usize>, SimError> {
    let mut fails = below;
    let mut n = match passes {
        Some(p) => p,
        None => {
            let mut n = (below + 1).min(max);
            loop {
                if ok(n)? {
                    break n;
                }
                if n >= max {
                    return Ok(None);
                }
                fails = n;
                n = (n * 2).min(max);
            }
        }
    };
    // ok(n) holds; ok(fails) does not (or fails is 0).
    while n > fails + 1 {
        let mid = fails + (n - fails) / 2;
        if ok(mid)? {
            n = mid;
        } else {
            fails = mid;
        }
    }
    Ok(Some(n))
}

/// One simulated run of a fleet at `rate`: its summary, or `None` when it stopped early
/// because its TTFT percentile was already lost.
fn trial(mix: &[(&Offer, usize)], f: &Forecast, rate: f64) -> Result<Option<Summary>, SimError> {
    let fleet = fleet_of(mix)?;
    match fleet::run(&fleet, &f.at(rate), None, f.slo, "plan", late_bound(f)) {
        Ok(run) => Ok(Some(run.result.summary)),
        Err(SimError::Late(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The run SLO's tightest TTFT target as (percentile, seconds), when no tenant has an SLO of
/// its own (a tenant's could be looser).
fn late_bound(f: &Forecast) -> Option<TtftTarget> {
    if f.workload.tenants.iter().any(|t| t.slo.is_some()) {
        return None;
    }
    f.slo?
        .targets
        .iter()
        .filter(|(metric, _, _)| metric == "ttft")
        .map(|(_, pct, ms)| TtftTarget {
            percentile: *pct,
            seconds: ms / 1e3,
        })
        .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
}

fn met(s: &Option<Summary>) -> bool {
    s.as_ref().is_some_and(|s| s.slo_met == Some(true))
}

/// A fleet of `count` backends of each offer behind least-loaded routing, every backend
/// serving the one model `m`.
fn fleet_of(mix: &[(&Offer, usize)]) -> Result<Fleet, SimError> {
    let mut text = String::from("[routing]\nstrategy = \"least-loaded\"\n");
    let (mut backends, mut prices) = (Vec::new(), Vec::new());
    for (offer, count) in mix {
        for _ in 0..*count {
            // The engine's scheduler queues what it cannot run: the router's limit is not the
            // one that binds.
            text += &format!(
                "\n[[backend]]\nname = \"b{}\"\nurl = \"http://sim.invalid/v1\"\nregion = \"sim\"\n\
                 tier = \"sim\"\nmodels = [\"m\"]\nmax_concurrency = 1000000\n",
                backends.len() + 1
            );
            backends.push(offer.backend.clone());
            prices.push(offer.price_per_hour);
        }
    }
    if backends.len() > MAX_FLEET_BACKENDS {
        return Err(SimError::Workload(format!(
            "a fleet of {} backends: at most {MAX_FLEET_BACKENDS}",
            backends.len()
        )));
    }
    let config = Config::parse(&text).map_err(|e| SimError::Workload(e.to_string()))?;
    Ok(Fleet {
        config,
        backends,
        prices,
    })
}

/// The cheapest fleet of two types together (among the [`MIX_TYPES`] cheapest alone), when
/// it is cheaper than the cheapest alone: for several counts `k` of one type, the fewest `m` of
/// the other that meet the SLO with them. `m` is bisected: none of the other with fewer than
/// the first type's own count misses, and the other's own count meets it (with `k` more, and
/// more `k` never needs more `m`).
fn cheapest_mix(
    offers: &[Offer],
    single: &[Result<Choice, String>],
    f: &Forecast,
    rate: f64,
) -> Result<Option<Choice>, SimError> {
    let mut alone: Vec<(usize, usize)> = single
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.as_ref().ok()?.mix[0].1)))
        .collect();
    alone.sort_by(|a, b| {
        let price = |&(i, n): &(usize, usize)| offers[i].price_per_hour * n as f64;
        price(a).total_cmp(&price(b))
    });
    alone.truncate(MIX_TYPES);
    let Some(&(i0, n0)) = alone.first() else {
        return Ok(None);
    };
    let mut bar = offers[i0].price_per_hour * n0 as f64;
    let mut best: Option<Vec<(usize, usize)>> = None;
    let pairs = alone
        .iter()
        .enumerate()
        .flat_map(|(x, &a)| alone[x + 1..].iter().flat_map(move |&b| [(a, b), (b, a)]));
    for ((first, n_first), (other, n_other)) in pairs {
        let (p_first, p_other) = (offers[first].price_per_hour, offers[other].price_per_hour);
        let mut hi = n_other;
        for k in counts_below(n_first) {
            // Even one of the other could not make this cheaper.
            if p_first * k as f64 + p_other >= bar - 1e-9 {
                break;
            }
            let m = least(0, Some(hi), hi, |m| {
                Ok(met(&trial(
                    &[(&offers[first], k), (&offers[other], m)],
                    f,
                    rate,
                )?))
            })?
            .unwrap_or(hi);
            hi = m;
            let price = p_first * k as f64 + p_other * m as f64;
            if price < bar - 1e-9 {
                bar = price;
                best = Some(vec![(first, k), (other, m)]);
            }
        }
    }
    let Some(mix) = best else {
        return Ok(None);
    };
    let fleet: Vec<(&Offer, usize)> = mix.iter().map(|&(i, n)| (&offers[i], n)).collect();
    let summary = trial(&fleet, f, rate)?.ok_or_else(not_deterministic)?;
    Ok(Some(choice(offers, mix, summary, f.rate)))
}

/// Counts 1..n (exclusive) of a type to pair with another: all of them, or [`MIX_STEPS`]
/// spread evenly.
fn counts_below(n: usize) -> Vec<usize> {
    if n <= MIX_STEPS + 1 {
        return (1..n).collect();
    }
    let mut v: Vec<usize> = (1..=MIX_STEPS).map(|s| s * (n - 1) / MIX_STEPS).collect();
    v.dedup();
    v.retain(|&k| k >= 1 && k < n);
    v
}

/// Polls a future made of ready futures to its end. `serrano_bench::sweep::search` is async
/// (a measured sweep awaits real runs); a simulated run is synchronous, so every future it
/// awaits is ready and one poll finishes it. No executor crate needed for that.
fn ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The highest rate the fleet serves within the SLO: `serrano bench --sweep`'s own search
/// (double until it breaks, then bisect), starting from `start`. `None` when no
/// rate met it, or none broke it: a workload of few requests all arriving at once can stay
/// within an SLO without a TTFT bound at any rate.
fn capacity(mix: &[(&Offer, usize)], f: &Forecast, start: f64) -> Result<Option<f64>, SimError> {
    let broke = std::cell::Cell::new(false);
    let search = search(start, false, CAPACITY_BISECTIONS, |rate| {
        std::future::ready(
            trial(mix, f, rate)
                .map(|s| {
                    broke.set(broke.get() || !met(&s));
                    met(&s)
                })
                .map_err(|e| BenchError::Workload(e.to_string())),
        )
    });
    let best = ready(search)
        .ok_or_else(|| SimError::Workload("the capacity search did not finish".into()))?
        .map_err(|e| SimError::Workload(e.to_string()))?;
    Ok(best.filter(|_| broke.get()))
}

/// From the chosen count to twice it: utilization of the fleet at the peak rate and the cost
/// per 1M output tokens it makes.
fn provisioning(
    offer: &Offer,
    count: usize,
    capacity_one: f64,
    rate: f64,
    out_per_request: f64,
) -> Vec<Provisioning> {
    let mut counts = vec![count, count + 1, count + count.div_ceil(2), 2 * count];
    counts.dedup();
    counts
        .into_iter()
        .map(|n| Provisioning {
            count: n,
            utilization: rate / (capacity_one * n as f64),
            usd_per_1m_output_tokens: usd_per_1m(
                offer.price_per_hour * n as f64,
                rate * out_per_request,
            ),
        })
        .collect()
}

/// The device figures varied, each made [`SENSITIVITY_STEP`] better: (label, changed device).
fn variations(d: &Device, p: Precision) -> Vec<(String, Device)> {
    let up = 1.0 + SENSITIVITY_STEP;
    let down = 1.0 / up;
    let mut out = Vec::new();
    let mut vary = |label: &str, k: f64, change: &dyn Fn(&mut Device)| {
        let mut v = d.clone();
        change(&mut v);
        out.push((format!("{label} x{k:.2}"), v));
    };
    match p {
        Precision::Bf16 => vary("bf16_tflops", up, &|v| v.bf16_tflops *= up),
        Precision::Int8 => vary("int8_tops", up, &|v| v.int8_tops *= up),
    }
    vary("memory_gbs", up, &|v| v.memory_gbs *= up);
    vary("memory_gb", up, &|v| v.memory_gb *= up);
    vary("step_overhead_us", down, &|v| v.step_overhead_us *= down);
    vary("price_per_hour", down, &|v| v.price_per_hour *= down);
    out
}

/// Each figure of the offer's device made better in turn: the cost per 1M output tokens of
/// one backend at its SLO capacity (`capacity_one` as it is), most reduced first. Empty for
/// a calibrated backend (it has no datasheet figures).
fn sensitivity(
    offer: &Offer,
    f: &Forecast,
    capacity_one: f64,
    out_per_request: f64,
) -> Result<Vec<Sensitivity>, SimError> {
    let Timing::Roofline {
        device,
        model,
        precision,
    } = &offer.backend.timing
    else {
        return Ok(Vec::new());
    };
    let at_capacity = |d: &Device| -> Result<Option<f64>, SimError> {
        let o = Offer {
            name: d.name.clone(),
            backend: Backend {
                timing: Timing::Roofline {
                    device: d.clone(),
                    model: model.clone(),
                    precision: *precision,
                },
                scheduler: offer.backend.scheduler,
            },
            price_per_hour: d.price_per_hour,
        };
        Ok(capacity(&[(&o, 1)], f, capacity_one)?
            .map(|c| usd_per_1m(d.price_per_hour, c * out_per_request)))
    };
    // The device as it is, searched on the same grid as its variations (from the same start),
    // so that a change that does not touch the timing (the price) keeps its capacity exactly.
    let Some(base) = at_capacity(device)? else {
        return Ok(Vec::new());
    };
    // Each variation's search is independent: they run in parallel.
    let found: Vec<Option<(String, f64)>> = variations(device, *precision)
        .into_par_iter()
        .map(|(change, d)| Ok(at_capacity(&d)?.map(|usd| (change, usd))))
        .collect::<Result<_, SimError>>()?;
    let mut out: Vec<Sensitivity> = found
        .into_iter()
        .flatten()
        .map(|(change, usd)| Sensitivity {
            change,
            usd_per_1m_output_tokens: usd,
            change_pct: (usd / base - 1.0) * 100.0,
        })
        .collect();
    out.sort_by(|a, b| a.change_pct.total_cmp(&b.change_pct));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    pub(super) use crate::catalog::Catalog;
    use crate::roofline::ModelShape;
    use serrano_engine::scheduler::SchedulerConfig;

    pub(super) fn offer(catalog: &Catalog, name: &str) -> Offer {
        let device = catalog.variant(name).unwrap();
        let model = ModelShape::from_spec(catalog.model("llama-3.1-8b").unwrap());
        Offer {
            name: device.name.clone(),
            price_per_hour: device.price_per_hour,
            backend: Backend {
                timing: Timing::Roofline {
                    device,
                    model,
                    precision: Precision::Bf16,
                },
                scheduler: SchedulerConfig {
                    max_num_seqs: 64,
                    max_batch_tokens: 2048,
                },
            },
        }
    }

    /// A forecast of `w` simulating 10 s a point.
    fn forecast<'a>(
        w: &'a Workload,
        slo: Option<&'a Slo>,
        rate: f64,
        headroom: f64,
        max_count: usize,
        diurnal: Option<&'a [f64]>,
    ) -> Forecast<'a> {
        Forecast {
            workload: w,
            slo,
            rate,
            headroom,
            duration_s: 10.0,
            max_count,
            diurnal,
        }
    }

    pub(super) fn workload() -> Workload {
        Workload::parse(
            "requests = 60\nwarmup_requests = 0\nseed = 5\n\
             prompt_tokens = { dist = \"uniform\", min = 64, max = 512 }\n\
             output_tokens = { dist = \"fixed\", value = 64 }\n\
             arrival = { kind = \"poisson\", rate = 1.0 }\n",
            false,
        )
        .unwrap()
    }

    #[test]
    fn least_finds_the_smallest_count_that_holds() {
        for threshold in 1..=40 {
            let mut asked = Vec::new();
            let got = least(0, None, 64, |n| {
                asked.push(n);
                Ok(n >= threshold)
            })
            .unwrap();
            assert_eq!(got, Some(threshold), "asked {asked:?}");
            // Doubling then bisecting: logarithmically many runs.
            assert!(asked.len() <= 2 * 7, "{threshold}: {asked:?}");
            // Known bounds are not asked again: from a count known to miss, or between it and
            // one known to meet.
            for below in 0..threshold {
                let mut asked = Vec::new();
                let got = least(below, None, 64, |n| {
                    asked.push(n);
                    Ok(n >= threshold)
                });
                assert_eq!(got.unwrap(), Some(threshold));
                assert!(asked.iter().all(|&n| n > below), "{below}: {asked:?}");
                let got = least(below, Some(64), 64, |n| {
                    asked.push(n);
                    Ok(n >= threshold)
                });
                assert_eq!(got.unwrap(), Some(threshold));
            }
            assert_eq!(
                least(threshold - 1, None, 64, |n| Ok(n >= threshold)).unwrap(),
                Some(threshold)
            );
        }
        assert_eq!(least(0, None, 10, |n| Ok(n > 10)).unwrap(), None);
        assert_eq!(least(0, None, 10, |n| Ok(n >= 10)).unwrap(), Some(10));
        assert_eq!(
            least(3, Some(4), 10, |_| panic!("nothing left to ask")).unwrap(),
            Some(4)
        );
    }

    #[test]
    fn counts_below_spread_over_the_range() {
        assert_eq!(counts_below(1), Vec::<usize>::new());
        assert_eq!(counts_below(4), [1, 2, 3]);
        let v = counts_below(40);
        assert_eq!(v.len(), MIX_STEPS);
        assert!(v.iter().all(|&k| (1..40).contains(&k)) && v.windows(2).all(|w| w[0] < w[1]));
    }

    /// A plan's count is the fewest that meets the SLO: one fewer does not, and what it
    /// costs follows from the count and the catalog price.
    #[test]
    fn the_plan_is_the_fewest_backends_that_meet_the_slo() {
        let catalog = Catalog::builtin().unwrap();
        let offers = [offer(&catalog, "l4")];
        let w = workload();
        let slo = Slo::parse("ttft_p99=1s,tpot_p99=120ms").unwrap();
        let f = forecast(&w, Some(&slo), 6.0, 1.5, 64, None);
        let p = plan(&offers, &f).unwrap();
        let c = p.single[0].as_ref().unwrap();
        let n = c.mix[0].1;
        assert!(
            n >= 2,
            "an L4 alone cannot take 9 requests/s of an 8B model: {n}"
        );
        let fewer = trial(&[(&offers[0], n - 1)], &f, 9.0).unwrap();
        assert!(!met(&fewer), "{} also meets it", n - 1);
        assert!((c.price_per_hour - n as f64 * offers[0].price_per_hour).abs() < 1e-9);
        let out = 6.0 * 64.0 * 3600.0;
        assert!((c.usd_per_1m_output_tokens - c.price_per_hour / out * 1e6).abs() < 1e-9);
        // The frontier's row at the asked headroom is the answer, and more headroom never
        // costs less.
        let row = p.frontier.iter().find(|(h, _)| *h == 1.5).unwrap();
        assert_eq!(row.1[0].as_ref().map(|c| c.mix[0].1), Some(n));
        let counts: Vec<usize> = p
            .frontier
            .iter()
            .map(|(_, r)| r[0].as_ref().unwrap().mix[0].1)
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        // Over-provisioning: more backends, lower utilization, more per token.
        assert_eq!(p.provisioning[0].count, n);
        assert!(p
            .provisioning
            .windows(2)
            .all(|w| w[1].utilization < w[0].utilization
                && w[1].usd_per_1m_output_tokens > w[0].usd_per_1m_output_tokens));
        // One backend's capacity is below the target rate (it took more than one) and within
        // what n of them serve.
        let c1 = p.capacity[0].unwrap();
        assert!(c1 > 0.0 && c1 < 9.0, "{c1} x {n}");
    }

    /// The sensitivity ranking: on a decode-heavy load an L4 is bound by its memory
    /// bandwidth, so more bandwidth cuts the cost per token and a cheaper hour cuts it by
    /// exactly the price's share; more memory capacity does not help much.
    #[test]
    fn sensitivity_ranks_what_moves_cost_per_token() {
        let catalog = Catalog::builtin().unwrap();
        let o = offer(&catalog, "l4");
        let w = workload();
        let slo = Slo::parse("ttft_p99=1s,tpot_p99=120ms").unwrap();
        let f = forecast(&w, Some(&slo), 2.0, 1.0, 8, None);
        let c1 = capacity(&[(&o, 1)], &f, 2.0).unwrap().unwrap();
        let s = sensitivity(&o, &f, c1, 64.0).unwrap();
        let pct = |label: &str| {
            s.iter()
                .find(|x| x.change.split(' ').next() == Some(label))
                .map(|x| x.change_pct)
                .unwrap()
        };
        assert!((pct("price_per_hour") - (0.8 - 1.0) * 100.0).abs() < 1e-6);
        assert!(pct("memory_gbs") < -5.0, "{s:?}");
        assert!(pct("memory_gbs") < pct("memory_gb"), "{s:?}");
        assert!(s.windows(2).all(|w| w[0].change_pct <= w[1].change_pct));
    }

    /// What a plan cannot be asked.
    #[test]
    fn a_plan_without_an_slo_or_a_fitting_device_says_why() {
        let catalog = Catalog::builtin().unwrap();
        let w = workload();
        let f = forecast(&w, None, 1.0, 1.5, 4, None);
        let e = plan(&[offer(&catalog, "l4")], &f).unwrap_err().to_string();
        assert!(e.contains("needs an SLO"), "{e}");
        let slo = Slo::parse("ttft_p99=1s").unwrap();
        let f = Forecast {
            slo: Some(&slo),
            ..f
        };
        // 8B in BF16 is 16 GB: a 12 GB card cannot hold it.
        let small = offer(&catalog, "small=l4,memory_gb=12");
        let e = plan(std::slice::from_ref(&small), &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        let p = plan(&[small, offer(&catalog, "l4")], &f).unwrap();
        assert!(p.single[0]
            .as_ref()
            .is_err_and(|e| e.contains("do not fit")));
        assert_eq!(p.best().map(|c| c.mix[0].0), Some(1));
        assert!(plan(&[], &f).is_err());
    }

    /// Same inputs, same plan.
    #[test]
    fn a_plan_is_deterministic() {
        let catalog = Catalog::builtin().unwrap();
        let offers = [offer(&catalog, "l4"), offer(&catalog, "a100-sxm-80gb")];
        let w = workload();
        let slo = Slo::parse("ttft_p99=500ms").unwrap();
        let f = forecast(&w, Some(&slo), 12.0, 1.0, 16, None);
        let a = plan(&offers, &f).unwrap();
        let b = plan(&offers, &f).unwrap();
        assert_eq!(format!("{:?}", a.single), format!("{:?}", b.single));
        assert_eq!(format!("{:?}", a.mixed), format!("{:?}", b.mixed));
        assert_eq!(a.sensitivity, b.sensitivity);
    }

    /// A day whose traffic falls to a third overnight: the hourly-resized fleet follows the
    /// curve (never above the peak's size, fewer in the trough) and costs less per token than
    /// the fleet fixed at the peak; an idle hour costs nothing resized.
    #[test]
    fn a_diurnal_day_costs_less_resized_than_fixed() {
        let catalog = Catalog::builtin().unwrap();
        let offers = [offer(&catalog, "l4")];
        let w = workload();
        let slo = Slo::parse("ttft_p99=1s,tpot_p99=120ms").unwrap();
        let curve = [0.0, 0.3, 0.3, 0.6, 1.0, 1.0, 0.6];
        let f = forecast(&w, Some(&slo), 12.0, 1.5, 16, Some(&curve));
        let p = plan(&offers, &f).unwrap();
        let d = p.day.unwrap();
        let peak = p.single[0].as_ref().unwrap().mix[0].1;
        assert_eq!(d.fixed_count, peak);
        assert!(peak >= 2, "{peak}");
        assert_eq!(d.counts[0], 0);
        assert_eq!(d.counts[4], peak);
        assert!(
            d.counts[1] < peak && d.counts[1] <= d.counts[3],
            "{:?}",
            d.counts
        );
        assert!(d.autoscaled_usd < d.fixed_usd);
        assert!(d.autoscaled_usd_per_1m() < d.fixed_usd_per_1m());
        let tokens: f64 = curve.iter().map(|c| c * 12.0 * 64.0 * 3600.0).sum();
        assert!((d.output_tokens - tokens).abs() < 1e-6 * tokens);
        assert!(d.fixed_utilization.unwrap() < 1.0);
        let bad = [1.5];
        let e = plan(
            &offers,
            &Forecast {
                diurnal: Some(&bad),
                ..f
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("diurnal"), "{e}");
    }

    /// Stopping a run once its TTFT percentile is lost never changes the verdict: at loads
    /// from light to five times what one L4 serves, the early-stopped run meets the SLO
    /// exactly when the full run does, and the overloaded ones stop early.
    #[test]
    fn stopping_late_runs_early_keeps_the_verdict() {
        let catalog = Catalog::builtin().unwrap();
        let o = offer(&catalog, "l4");
        let w = workload();
        let slo = Slo::parse("ttft_p99=1s,tpot_p99=120ms").unwrap();
        let f = forecast(&w, Some(&slo), 1.0, 1.0, 4, None);
        let target = TtftTarget {
            percentile: 99.0,
            seconds: 1.0,
        };
        assert_eq!(late_bound(&f), Some(target));
        let mut stopped = 0;
        for rate in [2.0, 5.0, 8.0, 10.0, 11.0, 12.0, 14.0, 20.0, 50.0] {
            let fleet = fleet_of(&[(&o, 1)]).unwrap();
            let full = fleet::run(&fleet, &f.at(rate), None, f.slo, "t", None)
                .unwrap()
                .result;
            let early = trial(&[(&o, 1)], &f, rate).unwrap();
            assert_eq!(met(&early), full.summary.slo_met == Some(true), "{rate}");
            stopped += usize::from(early.is_none());
        }
        assert!(stopped >= 2, "{stopped}");
    }
}
