//! The highest load that still meets the SLO: double the rate (or concurrency) until the SLO
//! breaks, then bisect between the last pass and the first failure. Every point run is kept, so
//! the report can draw the throughput/latency curve.

use serde::Serialize;

use crate::run::{run, RunOptions, RunResult};
use crate::workload::{Arrival, Workload};
use crate::{BenchError, Target};

/// Most doublings (or halvings) before giving up on finding the SLO's edge.
const MAX_DOUBLINGS: u32 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// "rate" (requests/s, open loop) or "concurrency" (closed loop).
    pub load_kind: &'static str,
    /// Points in the order they were run.
    pub points: Vec<(f64, RunResult)>,
    /// The highest load that met the SLO, if any did.
    pub best: Option<f64>,
}

impl Sweep {
    /// Points sorted by load.
    pub fn curve(&self) -> Vec<&(f64, RunResult)> {
        let mut v: Vec<&(f64, RunResult)> = self.points.iter().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }
}

fn load_of(a: &Arrival) -> f64 {
    match *a {
        Arrival::Closed { concurrency } => f64::from(concurrency),
        Arrival::Constant { rate } | Arrival::Poisson { rate } | Arrival::Gamma { rate, .. } => {
            rate
        }
        Arrival::Ramp { to, .. } => to,
    }
}

/// The workload at another load; a closed loop's concurrency is rounded, at least 1.
pub fn at_load(w: &Workload, load: f64) -> Workload {
    let mut w = w.clone();
    w.arrival = match w.arrival {
        Arrival::Closed { .. } => Arrival::Closed {
            concurrency: (load.round() as u32).max(1),
        },
        Arrival::Constant { .. } => Arrival::Constant { rate: load },
        Arrival::Poisson { .. } | Arrival::Ramp { .. } => Arrival::Poisson { rate: load },
        Arrival::Gamma { cv, .. } => Arrival::Gamma { rate: load, cv },
    };
    w
}

/// The search itself, over any `try_load` that says whether a load met the SLO; separate from
/// running requests so that it is tested on its own.
pub async fn search<F, Fut>(
    start: f64,
    integer: bool,
    bisections: u32,
    mut try_load: F,
) -> Result<Option<f64>, BenchError>
where
    F: FnMut(f64) -> Fut,
    Fut: std::future::Future<Output = Result<bool, BenchError>>,
{
    let floor = if integer { 1.0 } else { start / 1024.0 };
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut load = start;
    for _ in 0..MAX_DOUBLINGS {
        if try_load(load).await? {
            lo = Some(load);
            if hi.is_some() {
                break;
            }
            load *= 2.0;
        } else {
            hi = Some(load);
            if lo.is_some() || load <= floor {
                break;
            }
            load = (load / 2.0).max(floor);
            if integer {
                load = load.floor().max(1.0);
            }
        }
    }
    let (Some(mut good), Some(mut bad)) = (lo, hi) else {
        return Ok(lo);
    };
    for _ in 0..bisections {
        let mid = if integer {
            ((good + bad) / 2.0).floor()
        } else {
            (good + bad) / 2.0
        };
        if mid <= good || mid >= bad {
            break;
        }
        if try_load(mid).await? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Ok(Some(good))
}

/// Runs the workload at increasing loads to find the highest that meets `opts.slo` and its
/// tenants' own SLOs.
pub async fn sweep(
    target: &Target,
    w: &Workload,
    opts: &RunOptions,
    bisections: u32,
) -> Result<Sweep, BenchError> {
    if opts.slo.is_none() && w.tenants.iter().all(|t| t.slo.is_none()) {
        return Err(BenchError::Workload(
            "a sweep needs an SLO (--slo, or a tenant's own slo in the workload)".into(),
        ));
    }
    let integer = !w.arrival.is_open();
    let points = std::cell::RefCell::new(Vec::new());
    let best = search(load_of(&w.arrival), integer, bisections, |load| {
        let w = at_load(w, load);
        let points = &points;
        async move {
            let r = run(target, &w, opts).await?;
            let met = r.summary.slo_met == Some(true);
            points.borrow_mut().push((load, r));
            Ok(met)
        }
    })
    .await?;
    Ok(Sweep {
        load_kind: if integer { "concurrency" } else { "rate" },
        points: points.into_inner(),
        best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(start: f64, integer: bool, capacity: f64) -> (Option<f64>, Vec<f64>) {
        let mut tried = Vec::new();
        let best = futures::executor::block_on(search(start, integer, 6, |l| {
            tried.push(l);
            async move { Ok(l <= capacity) }
        }))
        .unwrap();
        (best, tried)
    }

    #[test]
    fn doubles_then_bisects_to_the_edge() {
        let (best, tried) = find(1.0, false, 5.3);
        assert_eq!(&tried[..4], &[1.0, 2.0, 4.0, 8.0]);
        let best = best.unwrap();
        assert!(best <= 5.3 && best > 5.0, "{best} after {tried:?}");
    }

    #[test]
    fn halves_when_the_start_is_already_too_much() {
        let (best, tried) = find(16.0, true, 5.0);
        assert_eq!(&tried[..3], &[16.0, 8.0, 4.0]);
        assert_eq!(best, Some(5.0), "{tried:?}");
        let (best, _) = find(4.0, true, 0.5);
        assert_eq!(best, None, "not even one client meets it");
    }
}
