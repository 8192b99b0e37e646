//! serrano's OpenAI-compatible HTTP server (axum) in front of every backend.
//!
//! Requests are parsed into the wire types of `serrano-api`, validated once, and run through one
//! pipeline whatever serves them: the in-process engine, an OpenAI-compatible upstream, a simulated device
//! (`simulated`), or any other [`Backend`]. Every body has a size limit, every error is an OpenAI-style JSON object,
//! and accepted connections have TCP_NODELAY set.

mod admin;
mod agent;
mod app;
pub mod backend;
mod console;
pub mod engines;
mod error;
mod extract;
pub mod gov;
mod grammar;
pub mod listen;
pub mod local;
mod mcp;
mod openai;
mod params;
mod pipeline;
mod relay;
pub mod routing;
pub mod safety;
pub mod shield;
pub mod simulated;
mod state;
mod tools;
pub mod trace;
pub mod upstream;

pub use admin::{budget_amount, change_diff};
pub use app::{router, ROUTES};
pub use backend::Backend;
pub use error::ApiError;
pub use listen::{serve, serve_listener, App, ConnLimits};
pub use state::{AppState, AuthConfig, ServerConfig};
