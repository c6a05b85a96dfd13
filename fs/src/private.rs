//! Who may touch what the daemon keeps on the host. The data directory holds the node's key,
//! the CA's key on the first node, the metadata and the admin socket (which hands out join
//! tokens and purges volumes); the plugin socket makes and removes volumes. A user who can write
//! to either can take the cluster over, so the daemon makes them private and refuses to run on
//! a data directory others can write to.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates a data directory (and missing parents) readable by root only.
pub fn create_data_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Why a data directory is not safe to run a node on.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeDir {
    #[error("{}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error(
        "{} belongs to uid {owner}, not to the user running shoal (uid {me}): `chown {me} {}`",
        path.display(),
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "{} can be written by other users (mode {mode:o}), who could replace the node's keys or its admin socket: `chmod go-w {}`",
        path.display(),
        path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// Why `path` is not safe to run a node on, if it is not: it belongs to another user, or group
/// or others may write to it.
pub fn check_data_dir(path: &Path) -> Result<(), UnsafeDir> {
    let path_buf = || path.to_path_buf();
    let meta = std::fs::metadata(path).map_err(|source| UnsafeDir::Unreadable {
        path: path_buf(),
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(UnsafeDir::Owner {
            path: path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(UnsafeDir::Writable {
            path: path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The gid of the `docker` group, whose members may use Docker (and so its volume plugin).
pub fn docker_gid() -> Option<u32> {
    nix::unistd::Group::from_name("docker")
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Binds a unix socket at `path` that only its owner (and `group`, with `mode` 0o660) may
/// connect to. It is bound under a temporary name, given its mode and group, and then renamed
/// into place, so nobody can connect to it while it still has the umask's permissions.
pub fn bind_socket(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> io::Result<tokio::net::UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b/data");
        create_data_dir(&data).unwrap();
        let mode = std::fs::metadata(&data).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        check_data_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_data_dir(&data).unwrap_err().to_string();
        assert!(err.contains("chmod go-w"), "{err}");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_data_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(65534), None).unwrap();
        let err = check_data_dir(&data).unwrap_err().to_string();
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }

    #[tokio::test]
    async fn sockets_are_bound_with_their_mode_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let _l = bind_socket(&path, 0o600, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let path = dir.path().join("plugin.sock");
        let _l = bind_socket(&path, 0o660, Some(4242)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 4242));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary name is left behind");
    }
}
