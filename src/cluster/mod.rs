//! The Kubernetes side: which pod owns a source IP, what its namespace allows, and what its
//! ServiceAccount names.
//!
//! [`PodIndex`] is the pure part (plain data, unit-tested by building pods by hand);
//! [`PodStore`] shares it with requests and lets them wait for a pod; [`watch`] feeds it.

mod caches;
pub mod client;
pub mod events;
pub mod health;
mod index;
mod namespaces;
pub mod placement;
mod pod;
mod service_accounts;
mod store;
mod synced;
pub mod taint;
pub mod watch;

pub use caches::{CacheSettings, Caches};
pub use events::{PodEvents, Reason};
pub use index::{Change, PodIndex};
pub use namespaces::{NamespaceRules, NamespaceStore};
pub use pod::{AnnotationKeys, identity};
pub use service_accounts::{ServiceAccountEntry, ServiceAccountStore, role_of as service_account_role_of};
pub use store::PodStore;
pub use synced::Synced;
