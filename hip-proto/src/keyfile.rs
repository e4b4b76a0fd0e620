//! Host Identity key files: PKCS#8 PEM, created with mode 0600, and refused when group
//! or others can access them (the same rule OpenSSH applies to private keys).
//!
//! This is the only module of `hip-proto` that touches the file system; the protocol
//! core never does.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
};

use crate::identity::{HostIdentity, IdentityError};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `id` to a new file at `path` (mode 0600). An existing file is never
/// overwritten: losing a Host Identity silently would change the host's HIT.
pub fn save(path: &Path, id: &HostIdentity) -> Result<(), IdentityError> {
    let pem = id.to_pkcs8_pem()?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(pem.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Loads a key file, refusing one that group or others may read or write.
pub fn load(path: &Path) -> Result<HostIdentity, IdentityError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(IdentityError::KeyFile(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::KeyFileTooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    HostIdentity::from_pkcs8_pem(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Algorithm;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hip-proto-keyfile-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = fs::remove_file(&p);
        p
    }

    #[test]
    fn save_load_and_mode_rules() {
        let id = HostIdentity::generate(Algorithm::EcdsaP256, &mut ChaCha20Rng::seed_from_u64(1))
            .unwrap();
        let p = tmp("k.pem");
        save(&p, &id).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load(&p).unwrap().hit(), id.hit());
        // No overwrite.
        assert!(matches!(save(&p, &id), Err(IdentityError::Io { .. })));
        // Group-readable: refused, with the mode in the error.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        match load(&p) {
            Err(IdentityError::KeyFileTooOpen { mode, .. }) => assert_eq!(mode, 0o640),
            other => panic!("expected KeyFileTooOpen, got {other:?}"),
        }
        fs::remove_file(&p).unwrap();
    }
}
