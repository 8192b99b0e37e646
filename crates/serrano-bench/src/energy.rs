//! Energy per token where the machine can measure it: Intel/AMD RAPL package counters under
//! /sys/class/powercap (the whole CPU package: the server *and* this client when both run on the
//! machine, which the report states), and NVIDIA GPUs' energy counters through `nvidia-smi`
//! (`total_energy_consumption`, Volta and later). Virtual machines usually hide RAPL, and a
//! machine without a GPU has no `nvidia-smi`; then nothing is reported rather than a guess.

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

/// Every NVIDIA GPU's energy counter (millijoules since the driver loaded), from `nvidia_smi`;
/// `None` without the tool, a GPU, or a counter.
pub fn gpu_energy_mj(nvidia_smi: &str) -> Option<Vec<f64>> {
    let out = std::process::Command::new(nvidia_smi)
        .args([
            "--query-gpu=total_energy_consumption",
            "--format=csv,noheader,nounits",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_gpu_energy(&String::from_utf8_lossy(&out.stdout))
}

/// One number per GPU, one GPU per line; `[N/A]` or `[Not Supported]` on any GPU means no
/// total can be given.
fn parse_gpu_energy(text: &str) -> Option<Vec<f64>> {
    let v: Option<Vec<f64>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().ok().filter(|x: &f64| x.is_finite() && *x >= 0.0))
        .collect();
    v.filter(|v| !v.is_empty())
}

pub struct EnergyMeter {
    start: Vec<(PathBuf, u64, u64)>,
    gpu_start: Option<Vec<f64>>,
    at: Instant,
}

impl EnergyMeter {
    pub fn start() -> EnergyMeter {
        EnergyMeter {
            start: domains()
                .into_iter()
                .filter_map(|(p, range)| Some((p.clone(), range, read(&p)?)))
                .collect(),
            gpu_start: gpu_energy_mj("nvidia-smi"),
            at: Instant::now(),
        }
    }

    /// Joules the GPUs used since `start`, or `None` where they cannot say.
    pub fn stop_gpu(&self, output_tokens: u64) -> Option<Energy> {
        let before = self.gpu_start.as_ref()?;
        let after = gpu_energy_mj("nvidia-smi")?;
        if after.len() != before.len() {
            return None;
        }
        let mj: f64 = after
            .iter()
            .zip(before)
            .map(|(a, b)| (a - b).max(0.0))
            .sum();
        Some(self.energy(
            mj / 1e3,
            output_tokens,
            "NVIDIA GPUs of this machine (nvidia-smi total_energy_consumption): whatever ran on them",
        ))
    }

    fn energy(&self, joules: f64, output_tokens: u64, scope: &str) -> Energy {
        let secs = self.at.elapsed().as_secs_f64().max(1e-9);
        Energy {
            joules,
            joules_per_output_token: (output_tokens > 0).then(|| joules / output_tokens as f64),
            mean_watts: joules / secs,
            scope: scope.into(),
        }
    }

    /// Joules the CPU packages used since `start`, or `None` where RAPL is not readable.
    pub fn stop(&self, output_tokens: u64) -> Option<Energy> {
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
        Some(self.energy(
            uj as f64 / 1e6,
            output_tokens,
            "RAPL CPU package(s) of this machine: server and load generator together, DRAM and GPU excluded",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_energy_counters_parse_per_gpu_or_not_at_all() {
        assert_eq!(
            parse_gpu_energy("123456.5\n 7890 \n"),
            Some(vec![123456.5, 7890.0])
        );
        assert_eq!(parse_gpu_energy("[N/A]\n"), None);
        assert_eq!(parse_gpu_energy("100\n[Not Supported]\n"), None);
        assert_eq!(parse_gpu_energy(""), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_gpu_meter_reads_the_counters_nvidia_smi_reports() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nvidia-smi");
        std::fs::write(&fake, "#!/bin/sh\necho 1500.5\necho 250\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            gpu_energy_mj(fake.to_str().unwrap()),
            Some(vec![1500.5, 250.0])
        );
        assert_eq!(gpu_energy_mj("/nonexistent/nvidia-smi"), None);
    }
}
