//! Energy per token where the machine can measure it: Intel/AMD RAPL package counters under
//! /sys/class/powercap (the whole CPU package: the server *and* this client when both run on the
//! machine, which the report states). Virtual machines usually hide RAPL; then nothing is
//! reported rather than a guess.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Energy {
    pub joules: f64,
    pub joules_per_output_token: Option<f64>,
    pub mean_watts: f64,
    /// What the number covers.
    pub scope: String,
}

/// Package-level RAPL domains: (energy file, wrap-around range in microjoules).
fn domains() -> Vec<(PathBuf, u64)> {
    let Ok(dir) = std::fs::read_dir("/sys/class/powercap") else {
        return vec![];
    };
    dir.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            // intel-rapl:0, intel-rapl:1 (packages), not intel-rapl:0:0 (sub-domains).
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("intel-rapl:") && n.matches(':').count() == 1)
        })
        .filter_map(|p| {
            let range = std::fs::read_to_string(p.join("max_energy_range_uj"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            std::fs::read_to_string(p.join("energy_uj")).ok()?;
            Some((p.join("energy_uj"), range))
        })
        .collect()
}

fn read(path: &PathBuf) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub struct EnergyMeter {
    start: Vec<(PathBuf, u64, u64)>,
    at: Instant,
}

impl EnergyMeter {
    pub fn start() -> EnergyMeter {
        EnergyMeter {
            start: domains()
                .into_iter()
                .filter_map(|(p, range)| Some((p.clone(), range, read(&p)?)))
                .collect(),
            at: Instant::now(),
        }
    }

    /// Joules used since `start`, or `None` where RAPL is not readable.
    pub fn stop(self, output_tokens: u64) -> Option<Energy> {
        if self.start.is_empty() {
            return None;
        }
        let mut uj = 0u64;
        for (p, range, before) in &self.start {
            let after = read(p)?;
            // The counter wraps at its range.
            uj += if after >= *before {
                after - before
            } else {
                range - before + after
            };
        }
        let joules = uj as f64 / 1e6;
        let secs = self.at.elapsed().as_secs_f64().max(1e-9);
        Some(Energy {
            joules,
            joules_per_output_token: (output_tokens > 0).then(|| joules / output_tokens as f64),
            mean_watts: joules / secs,
            scope: "RAPL CPU package(s) of this machine: server and load generator together, DRAM and GPU excluded".into(),
        })
    }
}
