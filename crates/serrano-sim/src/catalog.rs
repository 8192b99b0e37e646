//! Devices from datasheets: peak compute by precision, memory bandwidth and capacity,
//! interconnect, power and price per hour, with the efficiency factors that turn peaks into
//! what a serving engine reaches. The built-in catalog (`catalog.toml`, compiled in) names the
//! source of every figure; a file of the same shape replaces it.

use serde::Deserialize;

/// The built-in catalog's text.
pub const BUILTIN: &str = include_str!("../catalog.toml");

/// Fraction of peak compute a serving engine's matmuls reach (an assumption; calibration
/// replaces it).
pub const DEFAULT_COMPUTE_EFFICIENCY: f64 = 0.5;
/// Fraction of peak memory bandwidth a decode step's weight reads reach.
pub const DEFAULT_MEMORY_EFFICIENCY: f64 = 0.8;
/// Fixed cost of a step beyond its roofline (launches, scheduling, sampling), microseconds.
pub const DEFAULT_STEP_OVERHEAD_US: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the catalog does not parse: {0}")]
    Parse(String),
    #[error("device '{name}': {problem}")]
    Invalid { name: String, problem: String },
    #[error("no device '{0}' in the catalog (try one of: {1})")]
    Unknown(String, String),
}

/// One device, as a datasheet describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub name: String,
    /// Where the figures come from.
    pub source: String,
    /// Dense BF16 tensor throughput, 10^12 FLOP/s.
    pub bf16_tflops: f64,
    /// Dense INT8 throughput, 10^12 OP/s.
    pub int8_tops: f64,
    /// Memory bandwidth, GB/s (10^9 bytes).
    pub memory_gbs: f64,
    /// Memory capacity, GB (10^9 bytes).
    pub memory_gb: f64,
    /// Device-to-device bandwidth, GB/s.
    pub interconnect_gbs: f64,
    /// Board power at full load, W.
    pub power_w: f64,
    /// Dollars per device-hour (an input).
    pub price_per_hour: f64,
    #[serde(default = "compute_efficiency")]
    pub compute_efficiency: f64,
    #[serde(default = "memory_efficiency")]
    pub memory_efficiency: f64,
    #[serde(default = "step_overhead_us")]
    pub step_overhead_us: f64,
}

fn compute_efficiency() -> f64 {
    DEFAULT_COMPUTE_EFFICIENCY
}
fn memory_efficiency() -> f64 {
    DEFAULT_MEMORY_EFFICIENCY
}
fn step_overhead_us() -> f64 {
    DEFAULT_STEP_OVERHEAD_US
}

impl Device {
    fn check(&self) -> Result<(), CatalogError> {
        let bad = |problem: &str| CatalogError::Invalid {
            name: self.name.clone(),
            problem: problem.to_string(),
        };
        let positive = [
            ("bf16_tflops", self.bf16_tflops),
            ("int8_tops", self.int8_tops),
            ("memory_gbs", self.memory_gbs),
            ("memory_gb", self.memory_gb),
            ("interconnect_gbs", self.interconnect_gbs),
            ("power_w", self.power_w),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(bad(&format!("{field} must be a positive number")));
        }
        if !(self.price_per_hour.is_finite() && self.price_per_hour >= 0.0) {
            return Err(bad("price_per_hour must be a number >= 0"));
        }
        let fractions = [self.compute_efficiency, self.memory_efficiency];
        if fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) {
            return Err(bad("efficiencies are fractions in (0, 1]"));
        }
        if !(self.step_overhead_us.is_finite() && self.step_overhead_us >= 0.0) {
            return Err(bad("step_overhead_us must be >= 0"));
        }
        if self.source.trim().is_empty() {
            return Err(bad("every device names the source of its figures"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "device")]
    pub devices: Vec<Device>,
}

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Catalog::parse(BUILTIN)
    }

    /// A catalog's TOML text, every device checked; names are unique.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let c: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))?;
        for (i, d) in c.devices.iter().enumerate() {
            d.check()?;
            if c.devices[..i].iter().any(|o| o.name == d.name) {
                return Err(CatalogError::Invalid {
                    name: d.name.clone(),
                    problem: "named twice".into(),
                });
            }
        }
        Ok(c)
    }

    pub fn device(&self, name: &str) -> Result<&Device, CatalogError> {
        self.devices.iter().find(|d| d.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
            CatalogError::Unknown(name.to_string(), names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_holds_the_datasheet_figures() -> Result<(), CatalogError> {
        let c = Catalog::builtin()?;
        let d = |n: &str| c.device(n).cloned();
        let h100 = d("h100-sxm")?;
        assert_eq!(
            (
                h100.bf16_tflops,
                h100.memory_gbs,
                h100.memory_gb,
                h100.power_w
            ),
            (989.0, 3350.0, 80.0, 700.0)
        );
        let h200 = d("h200-sxm")?;
        assert_eq!(
            (h200.bf16_tflops, h200.memory_gbs, h200.memory_gb),
            (989.0, 4800.0, 141.0)
        );
        let a100 = d("a100-sxm-80gb")?;
        assert_eq!((a100.bf16_tflops, a100.power_w), (312.0, 400.0));
        let l4 = d("l4")?;
        assert_eq!(
            (l4.bf16_tflops, l4.memory_gbs, l4.memory_gb, l4.power_w),
            (121.0, 300.0, 24.0, 72.0)
        );
        let mi = d("mi300x")?;
        assert_eq!(
            (mi.bf16_tflops, mi.memory_gbs, mi.memory_gb, mi.power_w),
            (1307.4, 5300.0, 192.0, 750.0)
        );
        assert!(c.device("inference-asic").is_ok());
        assert!(c.device("cpu-2vcpu-epyc").is_ok());
        assert!(c.devices.iter().all(|d| !d.source.is_empty()));
        let err = c.device("tpu").unwrap_err().to_string();
        assert!(err.contains("h100-sxm"), "{err}");
        Ok(())
    }

    #[test]
    fn a_bad_catalog_is_refused_naming_the_device_and_field() {
        let one = |extra: &str| {
            format!(
                "[[device]]\nname = \"x\"\nsource = \"s\"\nbf16_tflops = 1.0\nint8_tops = 1.0\n\
                 memory_gbs = 1.0\nmemory_gb = 1.0\ninterconnect_gbs = 1.0\npower_w = 1.0\n\
                 price_per_hour = 1.0\n{extra}"
            )
        };
        assert!(Catalog::parse(&one("")).is_ok());
        let e = Catalog::parse(&one("compute_efficiency = 1.5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'x'") && e.contains("efficienc"), "{e}");
        let e = Catalog::parse(&one("watts = 3\n")).unwrap_err().to_string();
        assert!(e.contains("watts"), "{e}");
        let e = Catalog::parse(&one("").replace("memory_gbs = 1.0", "memory_gbs = 0.0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory_gbs"), "{e}");
        let twice = format!("{}{}", one(""), one(""));
        assert!(Catalog::parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
