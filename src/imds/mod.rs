//! The metadata API pods see, on the app port.
//!
//! [`routes`] decides where a path goes, [`token`] issues and checks IMDSv2 tokens,
//! [`render`] shapes bodies like IMDS, [`upstream`] talks to the node's real IMDS, and
//! [`service`] puts them together for one request.

pub mod render;
pub mod routes;
pub mod service;
pub mod token;
pub mod upstream;

pub use service::ImdsService;
pub use token::TokenIssuer;
pub use upstream::UpstreamImds;
