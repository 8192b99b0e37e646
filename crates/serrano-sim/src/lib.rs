//! `serrano sim` and `serrano plan`: what inference hardware you may not own would do with your
//! traffic: the performance model of a device from its datasheet ([`catalog`]), the roofline
//! step time of a model on it ([`roofline`]), and one backend simulated with the engine's own
//! scheduler on a virtual clock ([`sim`]), and a fleet of them behind the router's own
//! strategies ([`fleet`]), with what each backend was doing over the run ([`timeline`]); the cheapest fleet for a traffic forecast at its SLO ([`plan`]); and a simulated device stepping on the wall clock, for a server's `sim` backend ([`live`]).

pub mod calibrate;
pub mod catalog;
pub mod fleet;
pub mod live;
pub mod plan;
pub mod profile;
pub mod roofline;
pub mod sim;
pub mod timeline;

pub use catalog::{Catalog, CatalogError, Device, ModelSpec};
pub use roofline::{ModelShape, Precision, StepTime};
