//! Entering a named network namespace (`ip netns` convention: `/run/netns/NAME`).
//!
//! Only the network namespace is changed, not the mount namespace: unlike
//! `ip netns exec`, which remounts `/sys` and so hides bpffs, a process that joins with
//! [`enter`] still sees `/sys/fs/bpf` and can pin maps there.

use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf};

/// Moves the calling thread into network namespace `name`.
///
/// Call it before starting other threads: `setns(2)` affects only the calling thread,
/// and threads spawned afterwards inherit it.
pub fn enter(name: &str) -> io::Result<()> {
    let path = PathBuf::from("/run/netns").join(name);
    let f = File::open(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", path.display()),
        )
    })?;
    // SAFETY: valid fd for the duration of the call.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("setns({}): {e}", path.display()),
        ));
    }
    Ok(())
}
