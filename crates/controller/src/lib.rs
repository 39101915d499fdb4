//! The compute controller.

mod as_of;
mod controller;
mod error;
mod instance;
mod introspection;
mod orchestrator;
mod response;

pub use as_of::{AsOfSelectionError, ImportFrontiers, select_as_of};
pub use controller::*;
pub use error::*;
pub use instance::*;
pub use introspection::{IntrospectionKind, IntrospectionState, peek_duration_bucket_ms};
pub use orchestrator::*;
pub use response::{ComputeControllerResponse, PeekNotification, PeekOutcome};
