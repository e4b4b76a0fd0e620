//! The hip agent: the daemon's building blocks, used by the `hip-agent` binary and
//! by the privileged integration tests.

pub mod netns;
