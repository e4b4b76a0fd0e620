//! hip's eBPF datapath, seen from userspace: load the object built from `hip-ebpf`,
//! attach its tc programs to interfaces, pin the maps under bpffs so operators can read
//! them with `bpftool map dump pinned /sys/fs/bpf/hip/…`, and read them back.
//!
//! Attachment goes through aya's `SchedClassifier::attach`, which uses tcx links on
//! kernels ≥ 6.6 and a netlink `clsact` filter on older ones (the 6.1 guest kernel of
//! the VM tests). A tcx link lives as long as its file descriptor (or its pin); a netlink
//! filter outlives the process, so [`Datapath::detach_stale`] removes those by name.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLinkId},
    },
};
pub use hip_common::{Counters, Direction, PIN_DIR};
use hip_common::{MAP_IFACE_STATS, PROG_TC_EGRESS, PROG_TC_INGRESS};

/// The eBPF object embedded at build time (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hip-ebpf.o"));

/// Errors of the datapath subsystem.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The agent was built without its eBPF object.
    #[error("this build has no eBPF object embedded: run `cargo xtask build-ebpf` and rebuild")]
    ObjectMissing,
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
    if cfg!(hip_ebpf_missing) || OBJECT.is_empty() {
        Err(DatapathError::ObjectMissing)
    } else {
        Ok(OBJECT)
    }
}

const PROGRAMS: [(&str, TcAttachType); 2] = [
    (PROG_TC_INGRESS, TcAttachType::Ingress),
    (PROG_TC_EGRESS, TcAttachType::Egress),
];

/// A loaded datapath: the object, its attachments, and where its maps are pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    attached: Vec<(String, &'static str, SchedClassifierLinkId)>,
}

impl Datapath {
    /// Loads the embedded object and pins its maps under `pin_dir` (created if needed).
    ///
    /// Maps already pinned there by an earlier run are removed first: a restarted agent
    /// starts from fresh maps, and [`Datapath::detach_stale`] removes old attachments.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        let obj = object()?;
        raise_memlock();
        ensure_bpffs(pin_dir)?;
        remove_pins(pin_dir)?;
        fs::create_dir_all(pin_dir).map_err(|source| DatapathError::Io {
            path: pin_dir.to_owned(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new().load(obj)?;
        for (name, map) in ebpf.maps() {
            let path = pin_dir.join(name);
            map.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        for (name, _) in PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attached: Vec::new(),
        })
    }

    /// Attaches the ingress and egress programs to `iface` (tcx on ≥ 6.6, netlink
    /// clsact before). Leftovers of a killed earlier run are removed first.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        detach_stale(iface)?;
        if !tc_uses_tcx() {
            // Netlink attachment needs the clsact qdisc; EEXIST means it is there already.
            if let Err(e) = tc::qdisc_add_clsact(iface) {
                if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
                {
                    return Err(DatapathError::Tc {
                        iface: iface.to_owned(),
                        source: e,
                    });
                }
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
        }
        Ok(pinned)
    }

    /// Reads the per-direction counters of every interface the programs are attached to.
    pub fn counters(&self, dir: Direction) -> Result<Counters, DatapathError> {
        read_counters_from(&self.ebpf, dir)
    }

    /// The directory the maps are pinned in.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches everything and removes the pins.
    pub fn shutdown(mut self) -> Result<(), DatapathError> {
        for (_, name, id) in std::mem::take(&mut self.attached) {
            if let Ok(prog) = program(&mut self.ebpf, name) {
                let _ = prog.detach(id);
            }
        }
        remove_pins(&self.pin_dir)
    }
}

fn read_counters_from(ebpf: &Ebpf, dir: Direction) -> Result<Counters, DatapathError> {
    let map = ebpf.map(MAP_IFACE_STATS).ok_or(DatapathError::Map {
        name: MAP_IFACE_STATS,
        source: aya::maps::MapError::InvalidName {
            name: MAP_IFACE_STATS.to_owned(),
        },
    })?;
    let arr: PerCpuArray<&MapData, Counters> =
        PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
            name: MAP_IFACE_STATS,
            source,
        })?;
    let per_cpu = arr
        .get(&(dir as u32), 0)
        .map_err(|source| DatapathError::Map {
            name: MAP_IFACE_STATS,
            source,
        })?;
    Ok(sum(&per_cpu))
}

fn sum(per_cpu: &PerCpuValues<Counters>) -> Counters {
    per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// Reads the counters from the map pinned under `pin_dir` (another process's datapath).
pub fn read_pinned_counters(pin_dir: &Path, dir: Direction) -> Result<Counters, DatapathError> {
    let path = pin_dir.join(MAP_IFACE_STATS);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::Map {
        name: MAP_IFACE_STATS,
        source,
    })?;
    let map = aya::maps::Map::PerCpuArray(data);
    let arr: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
            name: MAP_IFACE_STATS,
            source,
        })?;
    let per_cpu = arr
        .get(&(dir as u32), 0)
        .map_err(|source| DatapathError::Map {
            name: MAP_IFACE_STATS,
            source,
        })?;
    Ok(sum(&per_cpu))
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
