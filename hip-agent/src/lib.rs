//! The hip agent: the daemon's building blocks, used by the `hip-agent` binary and
//! by the privileged integration tests.

pub mod netns;
pub mod hip_driver;
pub mod config;
pub mod control;
pub mod daemon;
pub mod pool;
pub mod sip_service;
