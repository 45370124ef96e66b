//! The overlay identity: this peer's ed25519 keypair, whose public key is its `PeerId`
//! (JXTA's self-certifying peer id), persisted in the data dir so the id survives restarts.
//!
//! The file holds the key in libp2p's protobuf encoding, the format rust-libp2p, go-libp2p and
//! js-libp2p all read. It is created once with mode 0600 and never replaced: a file that does
//! not decode is an error for the operator to look at, because silently generating a new key
//! would change the peer id that credentials and other peers know this node by.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

/// File name of the overlay identity inside the data dir.
pub const IDENTITY_FILE: &str = "p2p-identity.key";

/// Largest identity file read, in bytes. An ed25519 keypair in protobuf encoding is 68 bytes;
/// the limit only keeps a wrong path from being read into memory whole.
const MAX_IDENTITY_FILE_BYTES: u64 = 64 * 1024;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the key file (or creating its directory) failed.
    #[error("overlay identity {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The file exists but does not hold a usable key. It is left as it is.
    #[error("overlay identity {} is not a valid libp2p ed25519 key: {reason}", path.display())]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

/// Loads the ed25519 keypair from `dir/IDENTITY_FILE` (libp2p protobuf encoding), or creates
/// it (and the dir), written with mode 0600 on Unix. A file that does not decode is an error,
/// never silently replaced.
pub fn load_or_create(dir: &Path) -> Result<Keypair, IdentityError> {
    let path = dir.join(IDENTITY_FILE);
    match read_secret_file(&path, MAX_IDENTITY_FILE_BYTES) {
        Ok(bytes) => return decode(&path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(IdentityError::Io { path, source }),
    }

    create_private_dir(dir).map_err(|source| IdentityError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let keypair = Keypair::generate_ed25519();
    let encoded = keypair
        .to_protobuf_encoding()
        .map_err(|e| IdentityError::InvalidKey {
            path: path.clone(),
            reason: format!("cannot encode the new key: {e}"),
        })?;
    match write_new_secret_file(&path, &encoded) {
        Ok(()) => {
            tracing::info!(
                path = %path.display(),
                peer_id = %keypair.public().to_peer_id(),
                "created overlay identity"
            );
            Ok(keypair)
        }
        // Another process created it between our read and our write: use its key, so both
        // agree on one peer id.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let bytes = read_secret_file(&path, MAX_IDENTITY_FILE_BYTES).map_err(|source| {
                IdentityError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
            decode(&path, &bytes)
        }
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

/// Decodes a protobuf-encoded keypair and insists on ed25519 (the key type the design names).
fn decode(path: &Path, bytes: &[u8]) -> Result<Keypair, IdentityError> {
    let invalid = |reason: String| IdentityError::InvalidKey {
        path: path.to_owned(),
        reason,
    };
    let keypair = Keypair::from_protobuf_encoding(bytes).map_err(|e| invalid(e.to_string()))?;
    if keypair.clone().try_into_ed25519().is_err() {
        return Err(invalid(format!(
            "key type is {:?}, expected Ed25519",
            keypair.key_type()
        )));
    }
    Ok(keypair)
}

/// Reads a file of secret material, refusing files larger than `limit`, and warns when the
/// file is readable by others than its owner.
pub(crate) fn read_secret_file(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {limit} a key file can hold",
                meta.len()
            ),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "key file is accessible to other users; chmod 600 it"
            );
        }
    }
    fs::read(path)
}

/// Creates `dir` and its missing parents; on Unix the directories it creates get mode 0700,
/// since they hold keys.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `bytes` to a new file at `path` with mode 0600 on Unix, failing with
/// [`io::ErrorKind::AlreadyExists`] if the file exists (an existing key is never replaced).
/// The data is synced before returning; a failed write removes the partial file.
pub(crate) fn write_new_secret_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        // Best effort: the write error is the one worth reporting.
        let _ = fs::remove_file(path);
        return Err(e);
    }
    // Make the new directory entry durable too (best effort: not every platform can open a
    // directory for syncing).
    if let Some(parent) = path.parent()
        && let Ok(d) = fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_identity_when_created_and_loaded_again_then_the_peer_id_is_the_same() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data").join("nested");
        let first = load_or_create(&dir).expect("created");
        assert!(dir.join(IDENTITY_FILE).is_file());
        let second = load_or_create(&dir).expect("loaded");
        assert_eq!(
            first.public().to_peer_id(),
            second.public().to_peer_id(),
            "the peer id survives a restart"
        );
        assert!(second.try_into_ed25519().is_ok(), "the key is ed25519");
    }

    #[test]
    fn two_data_dirs_get_different_peer_ids() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ka = load_or_create(a.path()).expect("a");
        let kb = load_or_create(b.path()).expect("b");
        assert_ne!(ka.public().to_peer_id(), kb.public().to_peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn a_created_identity_file_is_readable_only_by_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        load_or_create(tmp.path()).expect("created");
        let mode = fs::metadata(tmp.path().join(IDENTITY_FILE))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn given_a_corrupted_identity_file_then_loading_fails_and_the_file_is_left_unchanged() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(IDENTITY_FILE);
        let garbage = b"\x08\x01\x12\x05not a key at all".to_vec();
        fs::write(&path, &garbage).expect("write");

        let err = load_or_create(tmp.path()).expect_err("a corrupted key must not load");
        assert!(
            matches!(err, IdentityError::InvalidKey { ref path, .. } if path.ends_with(IDENTITY_FILE)),
            "{err:?}"
        );
        assert_eq!(fs::read(&path).expect("read"), garbage, "file untouched");
    }

    #[test]
    fn given_an_empty_identity_file_then_loading_fails_rather_than_replacing_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(IDENTITY_FILE);
        fs::write(&path, b"").expect("write");
        assert!(load_or_create(tmp.path()).is_err());
        assert_eq!(fs::read(&path).expect("read"), b"");
    }

    #[test]
    fn writing_a_secret_file_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("k");
        write_new_secret_file(&path, b"one").expect("first write");
        let err = write_new_secret_file(&path, b"two").expect_err("second write");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).expect("read"), b"one");
    }
}
