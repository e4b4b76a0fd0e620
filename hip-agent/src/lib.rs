//! The hip agent: the daemon's building blocks, used by the `hip-agent` binary and
//! by the privileged integration tests.

pub mod config;
pub mod control;
pub mod daemon;
pub mod dns_verify;
pub mod edge;
pub mod hip_driver;
pub mod inspect;
pub mod metrics;
pub mod netns;
pub mod offload;
pub mod pool;
pub mod privileges;
pub mod secure;
pub mod sip_service;
