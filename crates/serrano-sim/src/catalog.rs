//! Devices from datasheets: peak compute by precision, memory bandwidth and capacity,
//! interconnect, power and price per hour, with the efficiency factors that turn peaks into
//! what a serving engine reaches; and the shapes of models to plan for without their weights.
//! The built-in catalog (`catalog.toml`, compiled in) names the source of every figure; a file
//! of the same shape replaces it. A what-if device is a catalog device with some figures
//! changed ([`Catalog::variant`]).

use serde::{Deserialize, Serialize};

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
    #[error("no model '{0}' in the catalog (try one of: {1})")]
    UnknownModel(String, String),
    #[error("what-if device '{spec}': {problem}")]
    Variant { spec: String, problem: String },
}

/// One device, as a datasheet describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// A model's dimensions, as its published config states them: enough for the roofline
/// ([`crate::roofline::ModelShape::from_spec`]) without the weights.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    /// Whether the output head shares the embedding's weights.
    pub tied_head: bool,
}

impl ModelSpec {
    fn check(&self) -> Result<(), CatalogError> {
        let dims = [
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.d_ff,
            self.vocab_size,
        ];
        // Grouped-query attention: query heads share KV heads evenly.
        let ok = dims.iter().all(|d| (1..=1 << 20).contains(d))
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && !self.source.trim().is_empty();
        ok.then_some(()).ok_or_else(|| CatalogError::Invalid {
            name: self.name.clone(),
            problem: "a model's dimensions are 1 to 2^20, query heads a multiple of KV heads, \
                      and its source is named"
                .into(),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(rename = "device")]
    pub devices: Vec<Device>,
    #[serde(rename = "model", default)]
    pub models: Vec<ModelSpec>,
}

/// Figures a what-if device may change: every number of a [`Device`].
pub const VARIANT_FIELDS: [&str; 10] = [
    "bf16_tflops",
    "int8_tops",
    "memory_gbs",
    "memory_gb",
    "interconnect_gbs",
    "power_w",
    "price_per_hour",
    "compute_efficiency",
    "memory_efficiency",
    "step_overhead_us",
];

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Catalog::parse(BUILTIN)
    }

    /// A catalog's TOML text, every device checked; names are unique.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let c: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse(e.to_string()))?;
        let twice = |name: &str| CatalogError::Invalid {
            name: name.to_string(),
            problem: "named twice".into(),
        };
        for (i, d) in c.devices.iter().enumerate() {
            d.check()?;
            if c.devices[..i].iter().any(|o| o.name == d.name) {
                return Err(twice(&d.name));
            }
        }
        for (i, m) in c.models.iter().enumerate() {
            m.check()?;
            if c.models[..i].iter().any(|o| o.name == m.name) {
                return Err(twice(&m.name));
            }
        }
        Ok(c)
    }

    pub fn model(&self, name: &str) -> Result<&ModelSpec, CatalogError> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            CatalogError::UnknownModel(name.to_string(), names.join(", "))
        })
    }

    /// A catalog device by name, or a what-if device: `NEW=BASE,FIELD=VALUE,...` is BASE with
    /// each FIELD (one of [`VARIANT_FIELDS`]) set to VALUE, or multiplied when VALUE is `xK`
    /// (`asic=h100-sxm,memory_gbs=x2` is an H100 with twice the bandwidth at the same power).
    /// The result is checked as a catalog device is, and its source says what was changed.
    pub fn variant(&self, spec: &str) -> Result<Device, CatalogError> {
        let Some((name, rest)) = spec.split_once('=') else {
            return self.device(spec).cloned();
        };
        let bad = |problem: String| CatalogError::Variant {
            spec: spec.to_string(),
            problem,
        };
        let mut parts = rest.split(',').map(str::trim);
        let base = self.device(parts.next().unwrap_or(""))?;
        let mut table = toml::Table::try_from(base).map_err(|e| bad(e.to_string()))?;
        let mut changed = Vec::new();
        for part in parts.filter(|p| !p.is_empty()) {
            let (field, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}': write FIELD=VALUE or FIELD=xFACTOR")))?;
            if !VARIANT_FIELDS.contains(&field) {
                return Err(bad(format!(
                    "'{field}' is not a device figure (one of: {})",
                    VARIANT_FIELDS.join(", ")
                )));
            }
            let number = |v: &str| v.parse::<f64>().ok().filter(|v| v.is_finite());
            let old = table.get(field).and_then(toml::Value::as_float);
            let new = match value.strip_prefix('x') {
                Some(k) => number(k).zip(old).map(|(k, old)| old * k),
                None => number(value),
            }
            .ok_or_else(|| bad(format!("'{value}': a number, or x and a factor")))?;
            table.insert(field.to_string(), toml::Value::Float(new));
            changed.push(format!("{field} {value}"));
        }
        let name = name.trim();
        if name.is_empty() || self.devices.iter().any(|d| d.name == name) {
            return Err(bad("name it something no catalog device is called".into()));
        }
        table.insert("name".into(), name.into());
        let source = format!("what-if: {} with {}", base.name, changed.join(", "));
        table.insert("source".into(), source.into());
        let d: Device = table.try_into().map_err(|e| bad(format!("{e}")))?;
        d.check()?;
        Ok(d)
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

    /// A what-if device is a catalog device with figures set or scaled; its source says so,
    /// and a bad field, value or name is refused naming it.
    #[test]
    fn a_what_if_device_changes_only_what_it_names() {
        let c = Catalog::builtin().unwrap();
        let h100 = c.device("h100-sxm").unwrap();
        assert_eq!(&c.variant("h100-sxm").unwrap(), h100);
        let v = c
            .variant("asic=h100-sxm, memory_gbs=x2, price_per_hour=2.5")
            .unwrap();
        assert_eq!(v.name, "asic");
        assert_eq!(v.memory_gbs, 2.0 * h100.memory_gbs);
        assert_eq!(v.price_per_hour, 2.5);
        assert_eq!(
            (v.bf16_tflops, v.power_w, v.memory_gb),
            (h100.bf16_tflops, h100.power_w, h100.memory_gb)
        );
        assert!(v.source.contains("h100-sxm") && v.source.contains("memory_gbs x2"));
        for (spec, why) in [
            ("a=h100-sxm,watts=3", "watts"),
            ("a=h100-sxm,memory_gbs=fast", "fast"),
            ("a=h100-sxm,memory_gbs", "FIELD=VALUE"),
            ("a=tpu,memory_gbs=x2", "tpu"),
            ("l4=h100-sxm,memory_gbs=x2", "name it"),
            ("a=h100-sxm,compute_efficiency=x3", "efficienc"),
        ] {
            let e = c.variant(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}
