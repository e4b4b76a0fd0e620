//! The kernel-IPsec subsystem's error type.

use std::io;

/// Everything that can go wrong while programming XFRM.
///
/// Kernel refusals keep the errno and the text `ip xfrm` would print for it, because the
/// netlink crates report only the number.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The kernel has no ESP: `xfrm_get_type()` found no handler for protocol 50 and the
    /// request failed with `EPROTONOSUPPORT` ("Requested type not found"). Happens on a
    /// kernel built without `CONFIG_INET_ESP`/`CONFIG_INET6_ESP` or without `esp4`/`esp6`
    /// loaded (the development host's kernel is such a kernel).
    #[error(
        "{op}: kernel has no ESP support (ESP not built in and esp4/esp6 not loaded): \
         Protocol not supported"
    )]
    NoEspSupport {
        /// The operation that was refused, e.g. `add SA 2001:db8::2 spi 0x1234`.
        op: String,
    },
    /// The kernel lacks a crypto algorithm of the transform (`ENOSYS` from the XFRM
    /// algorithm lookup).
    #[error("{op}: kernel crypto has no {alg}: Function not implemented")]
    AlgorithmUnavailable {
        /// The operation that was refused.
        op: String,
        /// The kernel algorithm names of the transform.
        alg: String,
    },
    /// The kernel refused a request; `message` is what `ip` prints for `errno`.
    #[error("{op}: {message}")]
    Kernel {
        /// The operation that was refused.
        op: String,
        /// Positive errno.
        errno: i32,
        /// `strerror(errno)` as `ip` prints it.
        message: String,
    },
    /// Opening or configuring a netlink socket failed.
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The netlink connection task has stopped (its runtime was shut down).
    #[error("netlink connection closed")]
    ConnectionClosed,
    /// The kernel answered with something this code does not expect.
    #[error("{op}: unexpected kernel reply: {detail}")]
    UnexpectedReply {
        /// The operation.
        op: String,
        /// What was wrong.
        detail: String,
    },
    /// A key does not have the length the transform needs.
    #[error("{transform}: {which} key must be {expected} octets, got {got}")]
    BadKeyLength {
        /// The transform's name.
        transform: &'static str,
        /// `encryption` or `integrity`.
        which: &'static str,
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The KEYMAT handed in is too short for two directions of the transform.
    #[error("KEYMAT too short for {transform}: need {need} octets, got {got}")]
    KeymatTooShort {
        /// The transform's name.
        transform: &'static str,
        /// Octets needed.
        need: usize,
        /// Octets given.
        got: usize,
    },
    /// A parameter is outside what the kernel or hip accepts.
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    /// The slot hip wants is held by an object hip does not own; hip never modifies it.
    #[error("{what} already exists and is not hip's (reqid/priority outside hip's range)")]
    ForeignConflict {
        /// The object, e.g. `SA 2001:db8::2 spi 0x100`.
        what: String,
    },
    /// An install failed and undoing its first steps failed too.
    #[error("{source}; rollback also failed: {rollback}")]
    RollbackFailed {
        /// The install error.
        #[source]
        source: Box<XfrmError>,
        /// The rollback error.
        rollback: Box<XfrmError>,
    },
}

impl XfrmError {
    /// The errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XfrmError::Kernel { errno, .. } => Some(*errno),
            XfrmError::NoEspSupport { .. } => Some(libc::EPROTONOSUPPORT),
            XfrmError::AlgorithmUnavailable { .. } => Some(libc::ENOSYS),
            _ => None,
        }
    }

    /// True if the kernel said the object does not exist (`ESRCH`/`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ESRCH | libc::ENOENT))
    }

    /// True if the kernel said the object exists already (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    pub(crate) fn kernel(op: impl Into<String>, errno: i32) -> Self {
        XfrmError::Kernel {
            op: op.into(),
            errno,
            message: errno_text(errno),
        }
    }
}

/// The text `ip` prints for a netlink errno (glibc's `strerror`).
pub fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    // std formats "File exists (os error 17)"; `ip` prints only the strerror part.
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_texts_match_ip() {
        assert_eq!(errno_text(libc::EEXIST), "File exists");
        assert_eq!(errno_text(libc::ESRCH), "No such process");
        assert_eq!(errno_text(libc::EPROTONOSUPPORT), "Protocol not supported");
    }

    #[test]
    fn no_esp_error_names_the_missing_support() {
        let e = XfrmError::NoEspSupport {
            op: "add SA".into(),
        };
        assert!(e.to_string().contains("kernel has no ESP support"), "{e}");
    }
}
