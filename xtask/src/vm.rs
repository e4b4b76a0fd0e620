//! `cargo xtask vm -- CMD…`: run CMD as root in a virtme-ng VM on the Debian kernel.
//!
//! The host kernel has no ESP and cannot load modules, so the ESP/BEET datapath runs in
//! a guest booted from the distribution kernel (`linux-image-amd64`), resolved at run
//! time. Nested KVM hangs here, so the guest runs under TCG (`--disable-kvm`): a boot
//! costs 25–50 s, hence one boot for many checks.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{setup, util};

#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Give up (and kill the VM) after this many minutes.
    #[arg(long, default_value_t = 30)]
    timeout_min: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

pub fn run(a: &VmArgs) -> Result<()> {
    let script = a
        .cmd
        .iter()
        .map(|s| shell_quote(s))
        .collect::<Vec<_>>()
        .join(" ");
    let st = run_script(
        &script,
        &a.memory,
        Duration::from_secs(a.timeout_min * 60),
        |l| println!("{l}"),
    )?;
    if !st.success() {
        bail!("command in the VM exited with {st}");
    }
    Ok(())
}

/// The newest generic Debian kernel under /boot (`vmlinuz-*-amd64`, not `-cloud-amd64`,
/// which lacks 9p and so cannot share the host's filesystem).
pub fn kernel() -> Result<PathBuf> {
    let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("vmlinuz-")?;
            if !ver.ends_with("-amd64") || ver.contains("cloud") {
                return None;
            }
            if !Path::new("/lib/modules").join(ver).is_dir() {
                return None;
            }
            let key = ver
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap_or(0))
                .collect();
            Some((key, e.path()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).context(
        "no /boot/vmlinuz-*-amd64 with modules: install linux-image-amd64 (cargo xtask setup)",
    )
}

/// Boots the VM, runs SCRIPT (a shell command line) as root after loading the XFRM/ESP
/// modules and mounting bpffs, streams each output line to `on_line`, and returns the
/// command's exit status.
pub fn run_script(
    script: &str,
    memory: &str,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<ExitStatus> {
    let vng = setup::vng_path().context("virtme-ng is missing: run `cargo xtask setup`")?;
    let kernel = kernel()?;
    eprintln!(
        "== vm: booting {} under TCG (slow: 25–50 s)",
        kernel.display()
    );
    let prelude = "set -e; for m in esp4 esp6 xfrm_user xfrm_ipcomp; do modprobe $m 2>/dev/null || true; done; \
                   grep -q esp4 /proc/modules || { echo 'vm: esp4 did not load' >&2; exit 97; }; \
                   mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; \
                   sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0; set +e; ";
    // The script goes to the guest as a file, not on `--exec`: virtme-ng passes `--exec`
    // on the kernel command line (base64), which x86 cuts at 2,048 bytes; past that the
    // `init=` after it is lost and the guest never starts (a checkout with a longer path
    // made the test stage's script cross it). The guest sees the host's file system.
    let dir = util::root().join("target/vm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!("script-{}.sh", std::process::id()));
    std::fs::write(&file, format!("{prelude}{script}\n"))
        .with_context(|| format!("writing {}", file.display()))?;
    let _cleanup = RemoveOnDrop(file.clone());
    let full = format!("sh {}", shell_quote(&file.to_string_lossy()));
    let mut c = util::cmd(&vng);
    c.arg("-r")
        .arg(&kernel)
        .args([
            "--disable-kvm",
            "--user",
            "root",
            "--memory",
            memory,
            "--cpus",
            "2",
        ])
        .args(["--exec", &full])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Piped, not inherited: vng/qemu reopen an inherited stderr at offset 0, which
        // overwrites a log file the caller redirected to.
        .stderr(Stdio::piped())
        // Own process group, so the watchdog can kill vng and its qemu together.
        .process_group(0);
    eprintln!("+ {} -r {} ... --exec <script>", vng, kernel.display());
    let mut child = c.spawn().context("starting vng")?;
    let pid = child.id() as i32;
    forward_interrupts(pid);
    let done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    {
        let (done, timed_out) = (done.clone(), timed_out.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            timed_out.store(true, Ordering::Relaxed);
            // SAFETY: signalling our own child's process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        });
    }
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        on_line(&line);
    }
    let st = child.wait()?;
    let _ = err_thread.join();
    done.store(true, Ordering::Relaxed);
    if timed_out.load(Ordering::Relaxed) {
        bail!("the VM did not finish within {timeout:?} and was killed");
    }
    Ok(st)
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The VM runs in its own process group (so the watchdog can kill it whole), which also
/// keeps a terminal's Ctrl-C from reaching it: this forwards SIGINT/SIGTERM as a kill of
/// the group, then exits, so an interrupted task leaves no VM behind.
fn forward_interrupts(pgid: i32) {
    PGID.store(pgid, Ordering::Relaxed);
    // SAFETY: the handler only calls async-signal-safe functions (kill, _exit).
    unsafe {
        libc::signal(libc::SIGINT, kill_vm as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, kill_vm as *const () as libc::sighandler_t);
    }
}

static PGID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_vm(_: libc::c_int) {
    // SAFETY: async-signal-safe calls only.
    unsafe {
        libc::kill(-PGID.load(Ordering::Relaxed), libc::SIGKILL);
        libc::_exit(130);
    }
}

/// Quotes a word for `sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
