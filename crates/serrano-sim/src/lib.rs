//! `serrano sim` and `serrano plan`: what inference hardware you may not own would do with your
//! traffic. This first part is the performance model of a device from its datasheet
//! ([`catalog`]) and the roofline step time of a model on it ([`roofline`]); the simulator that
//! drives the engine's own scheduler with it comes next.

pub mod catalog;
pub mod roofline;

pub use catalog::{Catalog, CatalogError, Device};
pub use roofline::{ModelShape, Precision, StepTime};
