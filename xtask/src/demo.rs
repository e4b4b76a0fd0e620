//! `cargo xtask demo`: the smallest real slice of hip until the end-to-end call lands.
//!
//! Today it shows the kernel datapath pieces that exist: the agent's own loader
//! attaches hip's tc programs to a veth between two network namespaces, UDP crosses it,
//! and the counters are read back from the pinned maps (as an operator would with
//! `hip-agent datapath stats` or `bpftool map dump`); then everything is removed.

use std::{net::UdpSocket, process::Command};

use anyhow::{Context, Result};

use crate::{ebpf, util};

struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in self.0.iter().rev() {
            let _ = Command::new(&c[0]).args(&c[1..]).output();
        }
    }
}

fn sh(args: &[&str]) -> Result<String> {
    util::output(util::cmd(args[0]).args(&args[1..]))
}

fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let fd = std::fs::File::open(&path).with_context(|| path.clone())?;
            // SAFETY: valid fd; affects only this thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

pub fn run() -> Result<()> {
    util::require_root("the demo")?;
    ebpf::build()?;
    let agent = ebpf::build_agent(false)?;
    let agent = agent.to_str().unwrap();
    println!("\n== hip demo (slice): eBPF datapath on a veth between two namespaces");
    println!("   (the end-to-end SIP+HIP call replaces this slice when it lands)\n");
    let (a, b, pin) = ("hipdemo-alice", "hipdemo-bob", "/sys/fs/bpf/hip-demo");
    let mut cleanup = Cleanup(Vec::new());
    for ns in [a, b] {
        let _ = sh(&["ip", "netns", "del", ns]);
        sh(&["ip", "netns", "add", ns])?;
        cleanup
            .0
            .push(vec!["ip".into(), "netns".into(), "del".into(), ns.into()]);
    }
    sh(&[
        "ip", "link", "add", "va", "netns", a, "type", "veth", "peer", "name", "vb", "netns", b,
    ])?;
    sh(&["ip", "-n", a, "addr", "add", "10.77.7.1/24", "dev", "va"])?;
    sh(&["ip", "-n", b, "addr", "add", "10.77.7.2/24", "dev", "vb"])?;
    sh(&["ip", "-n", a, "link", "set", "va", "up"])?;
    sh(&["ip", "-n", b, "link", "set", "vb", "up"])?;
    cleanup.0.push(vec![
        agent.into(),
        "--netns".into(),
        b.into(),
        "datapath".into(),
        "detach".into(),
        "--iface".into(),
        "vb".into(),
        "--pin-dir".into(),
        pin.into(),
    ]);
    print!(
        "{}",
        sh(&[
            agent,
            "--netns",
            b,
            "datapath",
            "attach",
            "--iface",
            "vb",
            "--pin-dir",
            pin
        ])?
    );
    let rx = in_netns(b, || Ok(UdpSocket::bind("10.77.7.2:5004")?))?;
    let n = 50;
    in_netns(a, || {
        let s = UdpSocket::bind("10.77.7.1:0")?;
        for i in 0..n {
            s.send_to(format!("packet {i}").as_bytes(), "10.77.7.2:5004")?;
        }
        Ok(())
    })?;
    let mut buf = [0u8; 64];
    for _ in 0..n {
        rx.recv(&mut buf)?;
    }
    println!("sent {n} UDP datagrams alice -> bob; counters read back from the pinned map:");
    print!("{}", sh(&[agent, "datapath", "stats", "--pin-dir", pin])?);
    println!(
        "bpftool's view: {}",
        sh(&[
            "bpftool",
            "map",
            "show",
            "pinned",
            &format!("{pin}/HIP_IFACE_STATS")
        ])?
        .trim()
    );
    drop(cleanup);
    println!("\ncleaned up: programs detached, pins and namespaces removed");
    Ok(())
}
