//! hip's eBPF datapath, seen from userspace: load the object built from `hip-ebpf`,
//! attach its tc programs to interfaces, pin the maps under bpffs so operators can read
//! them with `bpftool map dump pinned /sys/fs/bpf/hip/…`, and read them back.
//!
//! Attachment goes through aya's `SchedClassifier::attach`, which uses tcx links on
//! kernels ≥ 6.6 and a netlink `clsact` filter on older ones (the 6.1 guest kernel of
//! the VM tests). A tcx link lives as long as its file descriptor (or its pin); a netlink
//! filter outlives the process, so [`detach_stale`] removes those by name.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLinkId},
    },
};
pub use hip_common::{AssocState, Counters, Direction, LocatorState, PIN_DIR};
use hip_common::{PROG_TC_EGRESS, PROG_TC_INGRESS};

pub mod bench;
pub mod events;
pub mod maps;
#[cfg(test)]
#[path = "../stale.rs"]
mod stale;
#[cfg(test)]
mod stale_tests;

/// The shared map types (`hip-common`), for users that need the raw layouts.
pub use hip_common as common;

use aya_log::EbpfLogger;
pub use events::{DatapathEvent, EventReader};
pub use maps::{
    AssociationSpec, DatapathStats, Flow, GuardDrops, Maps, MediaConfig, PeerLocator, SpiCounters,
    addr_to_ip, ip_to_addr,
};

/// The eBPF object embedded at build time (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hip-ebpf.o"));

/// Errors of the datapath subsystem.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The agent was built without its eBPF object.
    #[error("this build has no eBPF object embedded: run `cargo xtask build-ebpf` and rebuild")]
    ObjectMissing,
    /// The object `cargo xtask build-ebpf` left is older than a source of it (the path
    /// named), so it was not embedded.
    #[error(
        "this build's eBPF object was older than {0}, so it was not embedded: run `cargo xtask build-ebpf` and rebuild"
    )]
    ObjectStale(&'static str),
    /// The kernel refused the object, a program or a map.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}: {source}")]
    Program {
        /// Program name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A link could not be turned into a pinnable fd link.
    #[error("link of {name}: {source}")]
    Link {
        /// Program name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning under bpffs failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: aya::pin::PinError,
    },
    /// A filesystem operation on the pin directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The media configuration is invalid (nothing was written).
    #[error("invalid media configuration: {0}")]
    InvalidConfig(&'static str),
    /// The association is invalid or conflicts with another (nothing was written).
    #[error("invalid association: {0}")]
    InvalidAssociation(&'static str),
    /// [`Datapath::events`] was called twice.
    #[error("the event reader was already taken")]
    EventsTaken,
    /// tc netlink failure.
    #[error("tc on {iface}: {source}")]
    Tc {
        /// Interface name.
        iface: String,
        /// What aya reported.
        #[source]
        source: tc::TcError,
    },
}

/// Returns the embedded eBPF object, or an error if this build has none.
pub fn object() -> Result<&'static [u8], DatapathError> {
    if cfg!(hip_ebpf_stale) {
        Err(DatapathError::ObjectStale(env!("HIP_EBPF_STALE_BY")))
    } else if cfg!(hip_ebpf_missing) || OBJECT.is_empty() {
        Err(DatapathError::ObjectMissing)
    } else {
        Ok(OBJECT)
    }
}

const PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_TC_INGRESS, TcAttachType::Ingress),
    (PROG_TC_EGRESS, TcAttachType::Egress),
];

/// Which of the two programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `hip_tc_ingress`: ESP per inbound SPI, locator changes, HIT-addressed RTP flows.
    Ingress,
    /// `hip_tc_egress`: ESP per outbound SPI, the media guard.
    Egress,
}

impl Hook {
    /// The program's name in the object.
    pub const fn program_name(self) -> &'static str {
        match self {
            Hook::Ingress => PROG_TC_INGRESS,
            Hook::Egress => PROG_TC_EGRESS,
        }
    }
}

/// What [`Datapath::start`] sets up.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Interfaces to attach both programs to.
    pub interfaces: Vec<String>,
    /// Where the maps are pinned ([`PIN_DIR`] by default).
    pub pin_dir: PathBuf,
    /// Media guard, RTP ports, clock rates, HIP-over-UDP port.
    pub media: MediaConfig,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            pin_dir: PathBuf::from(PIN_DIR),
            media: MediaConfig::default(),
        }
    }
}

/// A loaded datapath: the object, its attachments, its maps and where they are pinned.
///
/// Dropping it detaches the programs (aya drops the links: a tcx link closes, a
/// netlink filter is deleted) and removes the pins; [`Datapath::shutdown`] does the
/// same and reports errors.
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    /// Kept alive for the programs' lifetime (aya-log 0.3: dropping it closes the
    /// `AYA_LOGS` map fd, and `BPF_PROG_LOAD` then fails with "fd N is not pointing to
    /// valid bpf_map"). `None` if the object has no log statements.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    pin_dir: PathBuf,
    attached: Vec<(String, &'static str, SchedClassifierLinkId)>,
    /// Set by [`Datapath::attach_persistent`]: leave pins and links on drop.
    persistent: bool,
    /// The network namespace the programs were attached in: netlink (pre-tcx)
    /// detaches must be sent from there, whatever thread shuts the datapath down.
    netns: Option<fs::File>,
    shut_down: bool,
}

impl Datapath {
    /// Starts the datapath for the agent: removes what a killed earlier run left on
    /// `opts.interfaces` and under `opts.pin_dir`, loads the object, pins the maps,
    /// writes the media configuration and attaches both programs to every interface.
    /// On error nothing stays attached or pinned.
    pub fn start(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        for iface in &opts.interfaces {
            cleanup_leftovers(iface, &opts.pin_dir)?;
        }
        let mut dp = Self::load(&opts.pin_dir)?;
        dp.maps.set_media_config(&opts.media)?;
        for iface in &opts.interfaces {
            dp.attach(iface)?;
        }
        Ok(dp)
    }

    /// Loads the embedded object and pins its maps under `pin_dir` (created if needed).
    ///
    /// Maps already pinned there by an earlier run are removed first: a restarted agent
    /// starts from fresh maps, and [`detach_stale`] removes old attachments. The media
    /// configuration starts zeroed (guard off, no RTP port): call
    /// [`Datapath::set_media_config`].
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_object(object()?, pin_dir)
    }

    /// Like [`Datapath::load`] with another build of the `hip-ebpf` object (same
    /// map layouts): the benchmark compares program versions with it.
    pub fn load_object(obj: &[u8], pin_dir: &Path) -> Result<Self, DatapathError> {
        raise_memlock();
        ensure_bpffs(pin_dir)?;
        remove_pins(pin_dir)?;
        fs::create_dir_all(pin_dir).map_err(|source| DatapathError::Io {
            path: pin_dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new().load(obj)?;
        for (name, map) in ebpf.maps() {
            if !name.starts_with("HIP_") {
                continue;
            }
            let path = pin_dir.join(name);
            if let Err(source) = map.pin(&path) {
                let _ = remove_pins(pin_dir);
                return Err(DatapathError::Pin { path, source });
            }
        }
        // The logger takes AYA_LOGS out of `ebpf`; it must outlive program loading.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("no eBPF logger: {e}");
                None
            }
        };
        let loaded = (|| {
            for (name, _) in PROGRAMS {
                let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
                prog.load()
                    .map_err(|source| DatapathError::Program { name, source })?;
            }
            Maps::from_maps(|name| {
                ebpf.take_map(name).ok_or(DatapathError::Map {
                    name,
                    source: aya::maps::MapError::InvalidName {
                        name: name.to_owned(),
                    },
                })
            })
        })();
        let maps = match loaded {
            Ok(m) => m,
            Err(e) => {
                let _ = remove_pins(pin_dir);
                return Err(e);
            }
        };
        Ok(Self {
            ebpf,
            maps,
            logger,
            pin_dir: pin_dir.to_owned(),
            attached: Vec::new(),
            persistent: false,
            netns: None,
            shut_down: false,
        })
    }

    /// Attaches the ingress and egress programs to `iface` (tcx on ≥ 6.6, netlink
    /// clsact before). Leftovers of a killed earlier run are removed first.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        if self.netns.is_none() {
            self.netns = fs::File::open("/proc/thread-self/ns/net").ok();
        }
        detach_stale(iface)?;
        if !tc_uses_tcx() {
            // Netlink attachment needs the clsact qdisc; EEXIST means it is there already.
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(DatapathError::Tc {
                    iface: iface.to_owned(),
                    source: e,
                });
            }
        }
        for (name, kind) in PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(iface, kind)
                .map_err(|source| DatapathError::Program { name, source })?;
            tracing::info!(iface, program = name, tcx = tc_uses_tcx(), "attached");
            self.attached.push((iface.to_owned(), name, id));
        }
        Ok(())
    }

    /// Attaches like [`Datapath::attach`] but leaves the programs attached after this
    /// process exits: tcx links are pinned under `pin_dir/links/`, netlink filters
    /// persist by themselves. [`unload`] undoes it.
    pub fn attach_persistent(&mut self, iface: &str) -> Result<Vec<PathBuf>, DatapathError> {
        self.attach(iface)?;
        self.persistent = true;
        let mut pinned = Vec::new();
        if tc_uses_tcx() {
            let links_dir = self.pin_dir.join("links");
            fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Io {
                path: links_dir.clone(),
                source,
            })?;
            for (ifc, name, id) in std::mem::take(&mut self.attached) {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| DatapathError::Program { name, source })?;
                let fd_link: FdLink = link
                    .try_into()
                    .map_err(|source| DatapathError::Link { name, source })?;
                let path = links_dir.join(format!("{ifc}-{name}"));
                fd_link.pin(&path).map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
                pinned.push(path);
            }
        } else {
            // Netlink filters outlive the process only if aya does not delete them
            // when the program is dropped: take the links out of its bookkeeping.
            for (_, name, id) in std::mem::take(&mut self.attached) {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| DatapathError::Program { name, source })?;
                std::mem::forget(link);
            }
        }
        Ok(pinned)
    }

    /// Writes the media configuration (guard, RTP ports, clock rates, the
    /// HIP-over-UDP port).
    pub fn set_media_config(&mut self, cfg: &MediaConfig) -> Result<(), DatapathError> {
        self.maps.set_media_config(cfg)
    }

    /// Changes only the HIP-over-UDP port whose datagrams are counted as
    /// UDP-encapsulated ESP (0 = off); see [`Maps::set_esp_udp_port`].
    pub fn set_esp_udp_port(&mut self, port: u16) -> Result<(), DatapathError> {
        self.maps.set_esp_udp_port(port)
    }

    /// Adds (on ESTABLISHED) or updates (rekey, locator change) an association.
    pub fn upsert_association(&mut self, spec: &AssociationSpec) -> Result<(), DatapathError> {
        self.maps.upsert_association(spec)
    }

    /// Removes an association (on CLOSE) and its flows; returns their last statistics.
    pub fn remove_association(
        &mut self,
        peer_hit: std::net::Ipv6Addr,
    ) -> Result<Vec<Flow>, DatapathError> {
        self.maps.remove_association(peer_hit)
    }

    /// The maps (read access: flows, SPI counters, stats, …).
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps (write access).
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The flow table.
    pub fn flows(&self) -> Result<Vec<Flow>, DatapathError> {
        self.maps.flows()
    }

    /// Per-SPI counters.
    pub fn spi_counters(&self) -> Result<Vec<SpiCounters>, DatapathError> {
        self.maps.spi_counters()
    }

    /// All program counters.
    pub fn stats(&self) -> Result<DatapathStats, DatapathError> {
        self.maps.stats()
    }

    /// Takes the event reader (once; later calls fail with [`DatapathError::EventsTaken`]).
    pub fn events(&mut self) -> Result<EventReader, DatapathError> {
        self.maps
            .events
            .take()
            .map(EventReader::new)
            .ok_or(DatapathError::EventsTaken)
    }

    /// Forwards the programs' aya-log records (rare events only) to the `log` facade.
    pub fn flush_logs(&mut self) {
        if let Some(l) = &mut self.logger {
            l.flush();
        }
    }

    /// Reads the per-direction counters of every interface the programs are attached to.
    pub fn counters(&self, dir: Direction) -> Result<Counters, DatapathError> {
        self.maps.iface_counters(dir)
    }

    /// The directory the maps are pinned in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Runs one program once on `frame` (an Ethernet frame) with `BPF_PROG_TEST_RUN`
    /// and returns its verdict. For tests and benchmarks: the program sees the frame
    /// as an skb on the loopback device, without any XFRM state.
    pub fn test_run(&self, hook: Hook, frame: &[u8]) -> Result<i32, DatapathError> {
        self.test_run_repeat(hook, frame, 1).map(|(v, _)| v)
    }

    /// Like [`Datapath::test_run`], `repeat` times; also returns the kernel's mean
    /// run time per repetition.
    pub fn test_run_repeat(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DatapathError> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = hook.program_name();
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok((res.return_value as i32, res.duration))
    }

    /// The kernel's view of a loaded program (`BPF_OBJ_GET_INFO_BY_FD`): id, tag,
    /// translated and JIT-compiled sizes, verified instruction count, run statistics.
    pub fn program_info(&self, hook: Hook) -> Result<aya::programs::ProgramInfo, DatapathError> {
        let name = hook.program_name();
        let prog: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        prog.info()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// The kernel's accounting of a program (`kernel.bpf_stats_enabled`): total run
    /// time and run count since load.
    pub fn program_run_stats(
        &self,
        hook: Hook,
    ) -> Result<(std::time::Duration, u64), DatapathError> {
        let info = self.program_info(hook)?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Detaches from one interface (the programs stay loaded, the maps pinned).
    pub fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|(i, _, _)| i == iface);
        self.attached = rest;
        for (_, name, id) in mine {
            let prog = program(&mut self.ebpf, name)?;
            prog.detach(id)
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    /// Detaches every attachment, from the namespace they were made in (a helper
    /// thread joins it when the caller's thread is elsewhere).
    fn detach_all(&mut self) -> Option<DatapathError> {
        let attached = std::mem::take(&mut self.attached);
        if attached.is_empty() {
            return None;
        }
        let ebpf = &mut self.ebpf;
        let netns = self.netns.as_ref();
        let work = move || {
            if let Some(ns) = netns {
                use std::os::fd::AsRawFd;
                // SAFETY: valid namespace fd; affects only this helper thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    tracing::warn!("setns for detach: {}", io::Error::last_os_error());
                }
            }
            let mut first_err = None;
            for (_, name, id) in attached {
                match program(ebpf, name) {
                    Ok(prog) => {
                        if let Err(source) = prog.detach(id) {
                            first_err.get_or_insert(DatapathError::Program { name, source });
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            first_err
        };
        std::thread::scope(|s| s.spawn(work).join().unwrap_or(None))
    }

    /// Detaches everything and removes the pins.
    pub fn shutdown(mut self) -> Result<(), DatapathError> {
        self.shut_down = true;
        let mut first_err = self.detach_all();
        if let Err(e) = remove_pins(&self.pin_dir) {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.shut_down || self.persistent {
            return;
        }
        let _ = self.detach_all();
        let _ = remove_pins(&self.pin_dir);
    }
}

/// Reads the counters from the map pinned under `pin_dir` (another process's datapath).
pub fn read_pinned_counters(pin_dir: &Path, dir: Direction) -> Result<Counters, DatapathError> {
    Maps::open_pinned(pin_dir)?.iface_counters(dir)
}

/// Removes what a killed earlier run left: pinned tcx links, netlink filters with our
/// program names on `iface`, and the pinned maps. (A killed run's *unpinned* tcx
/// links went away with its file descriptors.)
pub fn cleanup_leftovers(iface: &str, pin_dir: &Path) -> Result<(), DatapathError> {
    unload(iface, pin_dir)
}

/// Detaches what a persistent attach (or a killed agent) left on `iface` and removes
/// the pins under `pin_dir`.
pub fn unload(iface: &str, pin_dir: &Path) -> Result<(), DatapathError> {
    let links_dir = pin_dir.join("links");
    if let Ok(entries) = fs::read_dir(&links_dir) {
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(link) = PinnedLink::from_pin(&path) {
                // Unpinning drops the last reference: the kernel detaches the tcx link.
                let _ = link.unpin();
            }
        }
    }
    detach_stale(iface)?;
    remove_pins(pin_dir)
}

/// Removes netlink tc filters carrying hip's program names from `iface`.
pub fn detach_stale(iface: &str) -> Result<(), DatapathError> {
    for (name, kind) in PROGRAMS {
        match tc::qdisc_detach_program(iface, kind, name) {
            Ok(()) => tracing::info!(iface, program = name, "removed stale tc filter"),
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            // No clsact qdisc at all: nothing of ours can be there.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(DatapathError::Tc {
                    iface: iface.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn remove_pins(pin_dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            path: pin_dir.to_owned(),
            source,
        }),
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// `statfs(2)` magic of bpffs (`BPF_FS_MAGIC` in `include/uapi/linux/magic.h`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure the bpffs that will hold `pin_dir` is mounted: mounts one at
/// `/sys/fs/bpf` when `pin_dir` lies under it and nothing is mounted there (as on hosts
/// whose init system does not mount it, and in the test VM).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) || fs_magic(root) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let io_err = |source| DatapathError::Io {
        path: root.to_owned(),
        source,
    };
    fs::create_dir_all(root).map_err(io_err)?;
    // SAFETY: NUL-terminated literals, null data pointer allowed by mount(2).
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn fs_magic(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (r == 0).then_some(st.f_type as i64)
}

/// Names of the programs attached to `iface` through tcx (both directions), as the
/// kernel reports them (`BPF_PROG_QUERY`); empty on kernels without tcx, where
/// `tc filter show` lists netlink attachments instead. Runs in the calling thread's
/// network namespace.
pub fn tcx_attached_programs(iface: &str) -> Result<Vec<String>, DatapathError> {
    if !tc_uses_tcx() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for (dir, kind) in [
        ("ingress", TcAttachType::Ingress),
        ("egress", TcAttachType::Egress),
    ] {
        let (_, infos) =
            SchedClassifier::query_tcx(iface, kind).map_err(|source| DatapathError::Program {
                name: if dir == "ingress" {
                    PROG_TC_INGRESS
                } else {
                    PROG_TC_EGRESS
                },
                source,
            })?;
        names.extend(
            infos
                .iter()
                .map(|i| format!("{dir}:{}", i.name_as_str().unwrap_or("?"))),
        );
    }
    Ok(names)
}

/// aya attaches with tcx on kernels ≥ 6.6 (see `SchedClassifier::attach`).
pub fn tc_uses_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it (harmless after).
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            io::Error::last_os_error()
        );
    }
}
