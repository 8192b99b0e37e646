//! serrano's routing: which backend serves a request, by policy (data residency, tiers), cost,
//! live latency and health; circuit breakers; the versioned TOML config that declares it all.
//!
//! This crate decides and keeps score; it knows nothing of HTTP. The server reaches backends and
//! reports each attempt's outcome back through [`Attempt::finish`].

pub mod breaker;
pub mod config;
pub mod latency;
pub mod plan;

pub use config::{Config, ConfigError, Kind, Strategy};
pub use plan::{
    Attempt, BackendState, BackendView, Candidate, Deployment, Outcome, Plan, RouteError, Router,
};
