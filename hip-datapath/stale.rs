//! Is the embedded eBPF object older than its sources? Shared by `build.rs` (which
//! refuses a stale object) and this crate's unit tests.
//!
//! The object is built by `cargo xtask build-ebpf` with another toolchain, outside cargo's
//! view of this crate, so nothing else notices when `hip-ebpf` or `hip-common` changed
//! after it was built. Modification times are what cargo itself compares for path
//! dependencies; a checkout, an edit or a `touch` of any source makes the object stale.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// The newest modification time among the files under `roots` (files or directories,
/// recursively), with the file that has it. Missing roots are skipped.
pub fn newest(roots: &[PathBuf]) -> Option<(SystemTime, PathBuf)> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::metadata(&p) else { continue };
        if md.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if let Ok(t) = md.modified()
            && best.as_ref().is_none_or(|(b, _)| t > *b)
        {
            best = Some((t, p));
        }
    }
    best
}

/// The source newer than `object`, if any: `Some(path)` means the object is stale.
pub fn newer_source(object: &Path, roots: &[PathBuf]) -> Option<PathBuf> {
    let built = fs::metadata(object).and_then(|m| m.modified()).ok()?;
    newest(roots).and_then(|(t, p)| (t > built).then_some(p))
}

/// The sources the eBPF object is built from, relative to hip-datapath's manifest
/// directory.
pub fn source_roots(manifest: &Path) -> Vec<PathBuf> {
    [
        "../hip-ebpf/src",
        "../hip-ebpf/Cargo.toml",
        "../hip-common/src",
        "../hip-common/Cargo.toml",
    ]
    .iter()
    .map(|r| manifest.join(r))
    .collect()
}
