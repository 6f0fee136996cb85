//! The Kubernetes side: which pod owns a source IP, and what its namespace allows.
//!
//! [`PodIndex`] is the pure part (plain data, unit-tested by building pods by hand);
//! [`PodStore`] shares it with requests and lets them wait for a pod; [`watch`] feeds it.

pub mod client;
pub mod events;
pub mod health;
mod index;
mod namespaces;
pub mod placement;
mod pod;
mod store;
pub mod taint;
pub mod watch;

pub use events::{PodEvents, Reason};
pub use index::{Change, PodIndex};
pub use namespaces::{NamespaceRules, NamespaceStore};
pub use pod::{AnnotationKeys, identity};
pub use store::PodStore;
