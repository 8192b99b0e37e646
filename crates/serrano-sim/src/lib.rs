//! `serrano sim` and `serrano plan`: what inference hardware you may not own would do with your
//! traffic: the performance model of a device from its datasheet ([`catalog`]), the roofline
//! step time of a model on it ([`roofline`]), and one backend simulated with the engine's own
//! scheduler on a virtual clock ([`sim`]).

pub mod catalog;
pub mod roofline;
pub mod sim;

pub use catalog::{Catalog, CatalogError, Device};
pub use roofline::{ModelShape, Precision, StepTime};
