//! Planners: which rank writes what on save, and which stored bytes fill
//! which destination on load.

pub(crate) mod intern;
mod load;
mod save;

pub use load::{BytesRead, DefaultLoadPlanner, LoadPlan, LoadPlanner, ReadItem};
pub use save::{DefaultSavePlanner, SavePlan, SavePlanner, TensorDecl, WriteIndex, WriteItem};
