//! Helpers for hip's privileged integration tests.
//!
//! These tests need root. They run through `cargo xtask test`, which builds the agent
//! and the eBPF object first and passes their paths in the environment:
//!
//! * files `tests/host_*.rs` run on the host, each test in network namespaces of its own;
//! * files `tests/vm_*.rs` run inside one virtme-ng VM boot on a Debian kernel that has
//!   ESP (the host kernel has none).
//!
//! Every namespace is created through [`NetNs`], whose `Drop` deletes it, so a failing
//! test cleans up too. Waiting is done on conditions ([`wait_until`]), never by sleeping
//! a fixed time.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod attack;
pub mod call;
pub mod dns;
pub mod edge_call;
pub mod metrics;
pub mod phone;
pub mod relay;
pub mod sip;
pub mod xfrm;

/// Path of the `hip-agent` binary built by `cargo xtask test` (`$HIP_AGENT_BIN`), or the
/// debug build in this workspace's target directory.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HIP_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/hip-agent");
    assert!(
        p.exists(),
        "hip-agent binary not found at {}: run the tests through `cargo xtask test`",
        p.display()
    );
    p
}

/// Path of the `hip-rtp` media tool (`$HIP_RTP_BIN`, or the debug build next to the agent).
pub fn rtp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HIP_RTP_BIN") {
        return PathBuf::from(p);
    }
    let p = agent_bin().with_file_name("hip-rtp");
    assert!(
        p.exists(),
        "hip-rtp not found at {}: run the tests through `cargo xtask test`",
        p.display()
    );
    p
}

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs `hip-agent ARGS…` (the binary of [`agent_bin`]), failing with its output if it
/// exits non-zero.
pub fn run_agent<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = agent_bin();
    run(bin.to_str().context("agent path")?, args)
}

/// A Host Identity key file made by `hip-agent hi new`, with its HIT.
#[derive(Clone, Debug)]
pub struct HostIdentityFile {
    /// The private key (PKCS#8 PEM, mode 0600).
    pub path: PathBuf,
    /// Its HIT as IPv6 text.
    pub hit: String,
    /// Its HIT as 32 upper-case hex digits (the form of SDP's `k=` line).
    pub hit_hex: String,
}

/// Makes a Host Identity of `algorithm` (`ecdsa-p256`, `ed25519`, …) in `DIR/NAME.pem`
/// with `hip-agent hi new --json`.
pub fn new_host_identity(
    dir: &std::path::Path,
    name: &str,
    algorithm: &str,
) -> Result<HostIdentityFile> {
    let path = dir.join(format!("{name}.pem"));
    let out = run_agent([
        "hi",
        "new",
        "--algorithm",
        algorithm,
        "--json",
        "--out",
        path.to_str().context("key path")?,
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("hi new --json: no {k}"))
    };
    Ok(HostIdentityFile {
        hit: field("hit")?,
        hit_hex: field("hit_hex")?,
        path,
    })
}

/// Runs `ip ARGS…`.
pub fn ip<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// A network namespace that is deleted when dropped (processes inside it are killed).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// Creates a namespace named `hipt-<prefix>-<pid>-<n>` with `lo` up.
    pub fn new(prefix: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("hipt-{prefix}-{}-{n}", std::process::id());
        ip(["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        ip(all)
    }

    /// A `Command` that runs PROGRAM inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs PROGRAM ARGS… inside the namespace, failing on a non-zero exit.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec![
            "netns".into(),
            "exec".into(),
            self.name.clone().into(),
            program.into(),
        ];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        ip(all)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it creates live here).
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let name = self.name.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                enter_netns(&name)?;
                Ok(f())
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill what still runs inside, then delete; ignore errors (best effort cleanup).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Removes what [`NetNs`] guards of this process left (for a process interrupted by a
/// signal, whose destructors do not run): kills the processes in its namespaces, deletes
/// them, and removes test pin directories named after them.
pub fn cleanup_own_namespaces() {
    let tag = format!("-{}-", std::process::id());
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name.starts_with("hipt-") && name.contains(&tag) {
            drop(NetNs {
                name: name.to_owned(),
            });
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/hip-test-{name}"));
        }
    }
}

static INTERRUPT_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = INTERRUPT_PIPE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// Runs `cleanup` on a helper thread when SIGINT or SIGTERM arrives, then exits with 130.
/// (A handler that writes to a pipe, not a blocked signal mask: children inherit masks.)
pub fn on_interrupt(cleanup: impl FnOnce() + Send + 'static) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the array; the handler is async-signal-safe.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return;
        }
        INTERRUPT_PIPE.store(fds[1], Ordering::Relaxed);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let rd = fds[0];
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: blocking read on our own pipe.
        while unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) } != 1 {}
        cleanup();
        std::process::exit(130);
    });
}

/// Removes a bpffs pin directory when dropped, so a failing test leaves no pinned maps.
/// (Tests assert the agent removed it themselves before this runs.)
#[derive(Debug)]
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Joins the calling thread to network namespace NAME.
pub fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening /run/netns/{name}"))?;
    // SAFETY: valid fd for the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({name}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Two namespaces joined by a veth pair, with addresses on each end.
#[derive(Debug)]
pub struct VethPair {
    pub a: NetNs,
    pub b: NetNs,
    /// Interface name inside `a` and `b`.
    pub if_a: String,
    pub if_b: String,
}

impl VethPair {
    /// Creates namespaces `a` and `b` joined by veth `va`/`vb`, with the given addresses
    /// (CIDR, e.g. `10.0.0.1/24` or `2001:db8::1/64`; IPv6 ones get `nodad`).
    pub fn new(prefix: &str, addrs_a: &[&str], addrs_b: &[&str]) -> Result<Self> {
        let a = NetNs::new(&format!("{prefix}a"))?;
        let b = NetNs::new(&format!("{prefix}b"))?;
        let (if_a, if_b) = ("va".to_owned(), "vb".to_owned());
        ip([
            "link",
            "add",
            &if_a,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &if_b,
            "netns",
            b.name(),
        ])?;
        for (ns, ifc, addrs) in [(&a, &if_a, addrs_a), (&b, &if_b, addrs_b)] {
            for addr in addrs {
                if addr.contains(':') {
                    ns.ip(["addr", "add", addr, "dev", ifc, "nodad"])?;
                } else {
                    ns.ip(["addr", "add", addr, "dev", ifc])?;
                }
            }
            ns.ip(["link", "set", ifc, "up"])?;
        }
        Ok(Self { a, b, if_a, if_b })
    }
}

/// Polls `cond` every 10 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
