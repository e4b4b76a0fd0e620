//! Real softphones for the edge-mode tests, headless and unmodified: baresip 1.0 (Debian's
//! `baresip-core`) and linphonec 5.1 (`linphone-cli`). Each account names only the local
//! hip agent as its outbound proxy and its digest credentials at the registrar. baresip
//! plays a WAV tone as its microphone (`aufile`) and the `sndfile` module records what it
//! receives (`dump-*-dec.wav`); linphonec plays and records WAV files (`soundcard use
//! files`, `play`, `record`) and takes its commands on stdin. The tone check counts 200 ms
//! blocks in which the tone dominates.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{
    NetNs,
    sip::{Trapezoid, kamailio},
};

/// Both proxies of the trapezoid with MD5 digest (what SIPp and baresip answer), and
/// RFC 3327 Path: atlanta.com for alice (`alice-pw`), biloxi.com for bob (`bob-pw`);
/// `biloxi_reply_route` is Kamailio script for biloxi.com's replies (or empty).
pub fn md5_proxies(t: &Trapezoid, dir: &Path, biloxi_reply_route: &str) -> Result<()> {
    for (ns, ip, domain, user, pw, peer_domain, peer_ip) in [
        (
            &t.hosts[1],
            "192.0.2.2",
            "atlanta.com",
            "alice",
            "alice-pw",
            "biloxi.com",
            "192.0.2.3",
        ),
        (
            &t.hosts[2],
            "192.0.2.3",
            "biloxi.com",
            "bob",
            "bob-pw",
            "atlanta.com",
            "192.0.2.2",
        ),
    ] {
        kamailio(
            ns,
            dir,
            &[
                ("IP", ip),
                ("DOMAIN", domain),
                ("USER", user),
                ("PASSWORD", pw),
                ("ALGORITHM", "MD5"),
                ("PEER_DOMAIN", peer_domain),
                ("PEER_IP", peer_ip),
                (
                    "REPLY_ROUTE",
                    if domain == "biloxi.com" {
                        biloxi_reply_route
                    } else {
                        ""
                    },
                ),
            ],
        )?;
    }
    Ok(())
}

/// Sample rate of the tones and of PCMU (RFC 3551).
pub const RATE: u32 = 8000;

/// Writes a mono 16-bit WAV of `secs` seconds of a `hz` sine.
pub fn write_tone(path: &Path, hz: f64, secs: u32) -> Result<()> {
    let n = RATE * secs;
    let mut data = Vec::with_capacity(n as usize * 2);
    for i in 0..n {
        let v = (2.0 * std::f64::consts::PI * hz * f64::from(i) / f64::from(RATE)).sin();
        data.extend_from_slice(&((v * 12_000.0) as i16).to_le_bytes());
    }
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&RATE.to_le_bytes());
    w.extend_from_slice(&(RATE * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.extend_from_slice(&data);
    std::fs::write(path, w)?;
    Ok(())
}

/// The first channel of a 16-bit PCM WAV and its sample rate.
pub fn read_wav(path: &Path) -> Result<(u32, Vec<i16>)> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if b.len() < 12 || &b[..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        bail!("{} is not a WAV file", path.display());
    }
    let (mut rate, mut channels, mut bits) = (0u32, 1u16, 16u16);
    let mut at = 12;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into()?) as usize;
        let body = &b[at + 8..(at + 8 + len).min(b.len())];
        if id == b"fmt " && body.len() >= 16 {
            channels = u16::from_le_bytes(body[2..4].try_into()?);
            rate = u32::from_le_bytes(body[4..8].try_into()?);
            bits = u16::from_le_bytes(body[14..16].try_into()?);
        } else if id == b"data" {
            if bits != 16 {
                bail!("{}: {bits}-bit samples", path.display());
            }
            let step = 2 * usize::from(channels.max(1));
            let samples = body
                .chunks_exact(step)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
            return Ok((rate, samples));
        }
        at += 8 + len + (len & 1);
    }
    bail!("{}: no data chunk", path.display())
}

/// Per 200 ms block: whether `hz` carries most of the block's energy (Goertzel power
/// against the block's total power, and a floor so that silence never counts).
pub fn tone_blocks(rate: u32, samples: &[i16], hz: f64) -> Vec<bool> {
    let n = (rate / 5) as usize;
    samples
        .chunks_exact(n)
        .map(|block| {
            let w = 2.0 * std::f64::consts::PI * hz / f64::from(rate);
            let coeff = 2.0 * w.cos();
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            let mut total = 0.0f64;
            for &x in block {
                let x = f64::from(x);
                total += x * x;
                let s0 = x + coeff * s1 - s2;
                s2 = s1;
                s1 = s0;
            }
            // |X(hz)|² scaled to the power of a pure sine of that frequency (N²/4 · A²/… ).
            let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
            let tone = 2.0 * power / n as f64; // energy at hz, comparable to `total`
            let rms = (total / n as f64).sqrt();
            rms > 500.0 && tone > 0.6 * total
        })
        .collect()
}

/// What a recording held: blocks with the tone, from the first to the last such block
/// (so that the ringing before the answer and the end after the hang-up are not
/// counted), and all blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToneReport {
    /// Blocks with the tone, between the first and the last tone block.
    pub found: usize,
    /// Blocks between the first and the last tone block, both included.
    pub span: usize,
    /// Blocks in the whole recording.
    pub total: usize,
    /// The index of the first tone block (media start, 200 ms units).
    pub first: Option<usize>,
}

/// Checks a recording for `hz`.
pub fn tone_report(path: &Path, hz: f64) -> Result<ToneReport> {
    let (rate, s) = read_wav(path)?;
    let b = tone_blocks(rate, &s, hz);
    let first = b.iter().position(|x| *x);
    let last = b.iter().rposition(|x| *x);
    let (found, span) = match (first, last) {
        (Some(f), Some(l)) => (b[f..=l].iter().filter(|x| **x).count(), l - f + 1),
        _ => (0, 0),
    };
    Ok(ToneReport {
        found,
        span,
        total: b.len(),
        first,
    })
}

/// Waits up to 5 s for a phone told to quit, then kills it.
fn reap(child: &mut Child) {
    for _ in 0..50 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running baresip; killed on drop.
pub struct Baresip {
    child: Child,
    /// Its config directory (config, accounts, recordings, log).
    pub dir: PathBuf,
}

/// How one phone is set up.
pub struct PhoneConfig<'a> {
    /// SIP user, domain and digest password.
    pub user: &'a str,
    /// The domain (registrar).
    pub domain: &'a str,
    /// The digest password at the registrar.
    pub password: &'a str,
    /// The local agent's edge address (`[::1]:5070`): the phone's only proxy setting.
    pub outbound: &'a str,
    /// Where the phone listens (`[::1]:5062`).
    pub listen: &'a str,
    /// The phone's media address (its `c=`).
    pub media_ip: &'a str,
    /// The tone it plays.
    pub tone: &'a Path,
    /// Answer incoming calls at once.
    pub auto_answer: bool,
    /// Commands at start-up (`/dial sip:bob@biloxi.com`).
    pub commands: &'a [&'a str],
    /// Quit after this many seconds (hangs up a call).
    pub quit_after: Option<u32>,
}

impl Baresip {
    /// Starts baresip in `ns` with a fresh configuration in `dir`.
    pub fn start(ns: &NetNs, dir: &Path, p: &PhoneConfig<'_>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = format!(
            "poll_method epoll\nsip_listen {}\nnet_interface {}\n\
             audio_player nil,nil\naudio_alert nil,nil\naudio_source aufile,{}\n\
             ausrc_srate 8000\nausrc_channels 1\nsnd_path {}\n\
             rtp_ports 10000-10100\njitter_buffer_delay 2-10\n\
             module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\n\
             module sndfile.so\nmodule cons.so\ncons_listen 127.0.0.1:5555\n\
             module_tmp account.so\nmodule_app menu.so\n",
            p.listen,
            p.media_ip,
            p.tone.display(),
            dir.display()
        );
        std::fs::write(dir.join("config"), config)?;
        let answer = if p.auto_answer {
            ";answermode=auto"
        } else {
            ""
        };
        std::fs::write(
            dir.join("accounts"),
            format!(
                "<sip:{}@{}>;auth_pass={};outbound=\"sip:{};transport=udp\";regint=300;audio_codecs=PCMU{answer}\n",
                p.user, p.domain, p.password, p.outbound
            ),
        )?;
        let log = std::fs::File::create(dir.join("baresip.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "baresip", "-f"])
            .arg(dir)
            .arg("-6")
            .arg("-s");
        for c in p.commands {
            cmd.args(["-e", c]);
        }
        if let Some(t) = p.quit_after {
            cmd.args(["-t", &t.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting baresip")?;
        Ok(Self {
            child,
            dir: dir.to_owned(),
        })
    }

    /// What baresip printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("baresip.log")).unwrap_or_default()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// The recording of what it received (`dump-*-dec.wav`), if any.
    pub fn received(&self) -> Option<PathBuf> {
        self.recordings().into_iter().next()
    }

    /// Its recordings of what it received, one per call, oldest first (the names carry
    /// the start time; two calls in the same second share one name, so space them).
    pub fn recordings(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("dump") && n.ends_with("-dec.wav"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Types `command` at its console (the `cons` module, UDP 127.0.0.1:5555 in `ns`),
    /// e.g. `/dial sip:alice@atlanta.com` or `/hangup`.
    pub fn command(&self, ns: &NetNs, command: &str) -> Result<()> {
        let line = format!("{command}\n");
        ns.run_in(|| -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.send_to(line.as_bytes(), "127.0.0.1:5555")?;
            Ok(())
        })??;
        Ok(())
    }

    /// Stops it (SIGTERM, then SIGKILL) and waits.
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        reap(&mut self.child);
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a linphonec is set up.
pub struct LinphoneConfig<'a> {
    /// SIP user, domain and digest password.
    pub user: &'a str,
    /// The domain (registrar).
    pub domain: &'a str,
    /// The digest password at the registrar.
    pub password: &'a str,
    /// The local agent's edge address (`[::1]:5070`): the phone's only proxy setting.
    pub outbound: &'a str,
    /// Its SIP port.
    pub sip_port: u16,
    /// The tone it plays.
    pub tone: &'a Path,
}

/// A running linphonec, driven on stdin; killed on drop.
pub struct Linphonec {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its directory (config, `HOME`, recordings, log).
    pub dir: PathBuf,
}

impl Linphonec {
    /// Starts linphonec in `ns` with a fresh configuration in `dir` (it rewrites its config
    /// on exit, so every run starts from this one): an account at `domain` through the
    /// agent's edge (`reg_route`, which linphonec needs beside `reg_proxy`), PCMU, IPv6,
    /// WAV files for sound; it plays `tone` in every call.
    pub fn start(ns: &NetNs, dir: &Path, p: &LinphoneConfig<'_>) -> Result<Self> {
        let home = dir.join("home");
        // Without its data directory the core never opens its ports.
        std::fs::create_dir_all(home.join(".local/share/linphone"))?;
        let rc = format!(
            "[sip]\nsip_port={port}\nsip_tcp_port=-1\nsip_tls_port=-1\nuse_ipv6=1\n\
             default_proxy=0\n\
             [rtp]\naudio_rtp_port=12000\n\
             [sound]\nechocancellation=0\n\
             [video]\nautomatically_initiate=0\nautomatically_accept=0\n\
             [audio_codec_0]\nmime=PCMU\nrate=8000\nchannels=1\nenabled=1\n\
             [audio_codec_1]\nmime=opus\nrate=48000\nchannels=2\nenabled=0\n\
             [proxy_0]\nreg_proxy=<sip:{out};transport=udp>\nreg_route=<sip:{out};transport=udp;lr>\n\
             reg_identity=\"{user}\" <sip:{user}@{domain}>\nreg_expires=300\nreg_sendregister=1\n\
             publish=0\n\
             [auth_info_0]\nusername={user}\npasswd={pw}\nrealm={domain}\ndomain={domain}\n",
            port = p.sip_port,
            out = p.outbound,
            user = p.user,
            domain = p.domain,
            pw = p.password,
        );
        let rc_path = dir.join("linphonerc");
        std::fs::write(&rc_path, rc)?;
        let log = std::fs::File::create(dir.join("linphonec.log"))?;
        let mut child = ns
            .command("linphonec")
            .arg("-c")
            .arg(&rc_path)
            .env("HOME", &home)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting linphonec")?;
        let stdin = child.stdin.take();
        let mut me = Self {
            child,
            stdin,
            dir: dir.to_owned(),
        };
        me.send("soundcard use files")?;
        me.send(&format!("play {}", p.tone.display()))?;
        Ok(me)
    }

    /// Types one command (`call sip:…`, `record FILE`, `pause`, `resume`, `terminate`,
    /// `autoanswer enable`).
    pub fn send(&mut self, command: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("linphonec's stdin is closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        Ok(())
    }

    /// What linphonec printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("linphonec.log")).unwrap_or_default()
    }

    /// Quits (its calls end with BYE), then SIGKILL if it lingers, and waits.
    pub fn stop(&mut self) {
        let _ = self.send("quit");
        self.stdin = None;
        reap(&mut self.child);
    }
}

impl Drop for Linphonec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_is_found_in_its_blocks_and_not_in_silence_or_another_tone() {
        let dir = std::env::temp_dir().join(format!("hip-phone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.wav");
        write_tone(&p, 1000.0, 2).unwrap();
        let r = tone_report(&p, 1000.0).unwrap();
        assert_eq!((r.found, r.span, r.total, r.first), (10, 10, 10, Some(0)));
        assert_eq!(tone_report(&p, 1500.0).unwrap().found, 0);
        let (rate, mut s) = read_wav(&p).unwrap();
        for x in &mut s[..3200] {
            *x = 0;
        }
        let b = tone_blocks(rate, &s, 1000.0);
        assert_eq!(b.iter().filter(|x| **x).count(), 8);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
