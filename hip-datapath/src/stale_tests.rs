//! `stale.rs`, which `build.rs` uses to refuse an eBPF object older than its sources.

use std::{
    fs,
    time::{Duration, SystemTime},
};

use crate::stale::{newer_source, newest};

fn set_mtime(p: &std::path::Path, t: SystemTime) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn an_object_older_than_any_source_is_stale_and_a_rebuilt_one_is_not() {
    let dir = std::env::temp_dir().join(format!("hip-stale-{}", std::process::id()));
    let src = dir.join("hip-ebpf/src/flow");
    fs::create_dir_all(&src).unwrap();
    let (a, b, obj) = (
        src.join("mod.rs"),
        dir.join("hip-ebpf/src/main.rs"),
        dir.join("obj"),
    );
    for f in [&a, &b, &obj] {
        fs::write(f, b"x").unwrap();
    }
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&a, t0);
    set_mtime(&b, t0 + Duration::from_secs(10));
    set_mtime(&obj, t0 + Duration::from_secs(20));
    let roots = vec![dir.join("hip-ebpf/src"), dir.join("missing-root")];
    assert_eq!(newest(&roots).unwrap().1, b);
    assert_eq!(newer_source(&obj, &roots), None, "built after every source");
    // An edit deep in the tree after the build makes it stale, naming the file.
    set_mtime(&a, t0 + Duration::from_secs(30));
    assert_eq!(newer_source(&obj, &roots), Some(a.clone()));
    // Rebuilt: fresh again.
    set_mtime(&obj, t0 + Duration::from_secs(40));
    assert_eq!(newer_source(&obj, &roots), None);
    // No object: nothing to call stale (build.rs reports it missing instead).
    assert_eq!(newer_source(&dir.join("none"), &roots), None);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_checked_sources_exist() {
    // A renamed crate or file would make the staleness check pass silently.
    let roots = crate::stale::source_roots(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
    for r in &roots {
        assert!(r.exists(), "{} is gone: update stale.rs", r.display());
    }
    assert!(newest(&roots).unwrap().1.extension().is_some());
}
