//! Nothing stays attached or pinned after the datapath stops: cleanly (SIGTERM), or
//! killed (SIGKILL) and then restarted (the restart removes the leftovers). Runs the
//! real `hip-agent datapath run` in a test namespace and reads the kernel's state
//! back with `bpftool` and bpffs; also reads the flow table with `hip-agent flows`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use hip_tests::{NetNs, VethPair, agent_bin, run_agent, wait_until};

struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    fn start(ns: &NetNs, iface: &str, pin: &Path) -> Self {
        let mut child = Command::new(agent_bin())
            .args(["--netns", ns.name(), "datapath", "run", "--iface", iface])
            .args(["--media-ports", "20000-20100", "--pin-dir"])
            .arg(pin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let a = Self { child, lines };
        a.wait_line("ready");
        a
    }

    fn wait_line(&self, want: &str) {
        wait_until(
            Duration::from_secs(20),
            &format!("agent prints {want:?}"),
            || match self.lines.try_recv() {
                Ok(l) if l == want => Some(()),
                _ => None,
            },
        )
        .unwrap();
    }

    fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// hip programs attached to `iface`: tcx links (queried from the kernel) and netlink
/// tc filters (`tc filter show`), one line each.
fn attached(ns: &NetNs, iface: &str) -> String {
    let ifc = iface.to_owned();
    let mut lines = ns
        .run_in(move || hip_datapath::tcx_attached_programs(&ifc))
        .unwrap()
        .unwrap();
    for dir in ["ingress", "egress"] {
        let out = ns
            .exec("tc", ["filter", "show", "dev", iface, dir])
            .unwrap();
        lines.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| format!("{dir}:{l}")),
        );
    }
    lines
        .into_iter()
        .filter(|l| l.contains("hip_tc_"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn pins(pin: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pin)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn nothing_left_after_clean_stop_or_kill_and_restart() {
    let p = VethPair::new("lc", &["10.79.0.1/24"], &["10.79.0.2/24"]).unwrap();
    let pin = PathBuf::from(format!("/sys/fs/bpf/hipt-lc-{}", std::process::id()));
    let _guard = hip_tests::PinDir(pin.clone());
    let ns = &p.b;
    let ifc = &p.if_b;
    assert!(attached(ns, ifc).is_empty());

    // 1. Clean stop.
    let mut a = Agent::start(ns, ifc, &pin);
    let att = attached(ns, ifc);
    assert!(
        att.contains("hip_tc_ingress") && att.contains("hip_tc_egress"),
        "{att}"
    );
    assert!(
        pins(&pin).contains(&"HIP_FLOWS".to_owned()),
        "{:?}",
        pins(&pin)
    );
    // The flow table of the running datapath, through the CLI.
    let out = run_agent([
        "flows",
        "--json",
        "--direct",
        "--pin-dir",
        pin.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(a.signal(libc::SIGTERM).success());
    assert!(!pin.exists(), "pins removed on SIGTERM: {:?}", pins(&pin));
    assert_eq!(attached(ns, ifc), "", "detached on SIGTERM");

    // 2. Killed: it cannot clean up. Its pins stay (what the restart must handle).
    let mut a = Agent::start(ns, ifc, &pin);
    let killed = a.signal(libc::SIGKILL);
    assert!(!killed.success());
    assert!(
        pins(&pin).contains(&"HIP_FLOWS".to_owned()),
        "a killed run leaves its pins"
    );
    if hip_datapath::tc_uses_tcx() {
        // tcx links die with their last file descriptor.
        assert_eq!(attached(ns, ifc), "");
    }

    // 3. Restart: leftovers removed, exactly one fresh attachment per direction.
    let mut a = Agent::start(ns, ifc, &pin);
    let att = attached(ns, ifc);
    let count = |name: &str| att.lines().filter(|l| l.contains(name)).count();
    assert_eq!(count("hip_tc_ingress"), 1, "{att}");
    assert_eq!(count("hip_tc_egress"), 1, "{att}");
    let stats = hip_datapath::Maps::open_pinned(&pin)
        .unwrap()
        .stats()
        .unwrap();
    assert_eq!(stats.guard_dropped, 0, "fresh maps after restart");
    assert!(a.signal(libc::SIGINT).success());
    assert!(!pin.exists(), "pins removed: {:?}", pins(&pin));
    assert_eq!(attached(ns, ifc), "");
}
