//! Handing a node's FUSE connection from a running daemon to its successor, so that processes
//! using the mount never see it end (a restart, an upgrade: `shoal daemon` started again with
//! the same `--data`, or SIGHUP, which starts it).
//!
//! The running daemon listens on `DATA/handover.sock` (the data directory is private). The
//! successor asks there for the mount it was told to serve; the running daemon stops reading
//! requests, answers those it has taken, and sends the connection's /dev/fuse fd (SCM_RIGHTS)
//! with its session and open files, then commits what is buffered, stops and exits. The
//! successor waits for it to be gone (it holds the data directory), starts the node in that
//! session and serves the fd. Meanwhile the kernel queues what processes ask: they wait, and
//! get their answers from the successor.

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::node::Resume;

/// The socket, in the data directory.
pub const SOCKET: &str = "handover.sock";

/// How long a successor waits for the running daemon to hand over (it first answers the
/// requests it took, which a slow peer can hold up).
const PATIENCE: Duration = Duration::from_secs(120);

pub fn socket_path(data: &Path) -> PathBuf {
    data.join(SOCKET)
}

/// What a successor asks for.
#[derive(Serialize, Deserialize)]
struct Ask {
    mount: PathBuf,
}

/// What the running daemon gives with the fd.
#[derive(Serialize, Deserialize, Debug)]
pub struct Given {
    /// The daemon handing over; the successor starts once it is gone.
    pub pid: i32,
    pub mount: PathBuf,
    pub resume: Resume,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Given(Given),
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the running daemon refused to hand over its mount: {0}")]
    Refused(String),
    #[error("handing over through {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the running daemon's answer on {0} is not understood: {1}")]
    Garbled(PathBuf, serde_json::Error),
    #[error("the running daemon sent no FUSE connection over {0}")]
    NoFd(PathBuf),
}

/// Asks the daemon running in `data` to hand over its mount at `mount`. `None` when no daemon
/// listens there (none runs, or one that predates hand-overs).
pub fn take_over(data: &Path, mount: &Path) -> Result<Option<(Given, OwnedFd)>, HandoverError> {
    let path = socket_path(data);
    let io = |e| HandoverError::Io(path.clone(), e);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(PATIENCE)).map_err(io)?;
    let ask = serde_json::to_vec(&Ask {
        mount: mount.to_path_buf(),
    })
    .expect("serializable");
    stream.write_all(&ask).map_err(io)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(io)?;

    // The fd comes with the first bytes; the rest of the answer follows until EOF.
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut first = vec![0u8; 64 << 10];
    let got = rustix::net::recvmsg(
        &stream,
        &mut [std::io::IoSliceMut::new(&mut first)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io(e.into()))?;
    let mut fd = None;
    for msg in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for received in fds {
                fd.get_or_insert(received);
            }
        }
    }
    first.truncate(got.bytes);
    stream.read_to_end(&mut first).map_err(io)?;
    let answer: Answer =
        serde_json::from_slice(&first).map_err(|e| HandoverError::Garbled(path.clone(), e))?;
    match answer {
        Answer::Refused(why) => Err(HandoverError::Refused(why)),
        Answer::Given(given) => match fd {
            Some(fd) => Ok(Some((given, fd))),
            None => Err(HandoverError::NoFd(path)),
        },
    }
}

/// The running daemon's side: successors ask here.
pub struct Offer {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

/// A successor's request, to answer with `give` or `refuse`.
pub struct Asked {
    stream: UnixStream,
    pub mount: PathBuf,
}

impl Offer {
    /// Listens in `data`, replacing a socket a dead daemon left.
    pub fn bind(data: &Path) -> std::io::Result<Offer> {
        let path = socket_path(data);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        Ok(Offer { listener, path })
    }

    /// The next successor that asks.
    pub async fn next(&self) -> std::io::Result<Asked> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let mut stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut ask = Vec::new();
            if let Err(e) = stream.read_to_end(&mut ask) {
                tracing::warn!(error = %e, "a hand-over request was cut short; ignored");
                continue;
            }
            match serde_json::from_slice::<Ask>(&ask) {
                Ok(ask) => {
                    return Ok(Asked {
                        stream,
                        mount: ask.mount,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "a garbled hand-over request; ignored"),
            }
        }
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Asked {
    pub fn refuse(mut self, why: &str) {
        let answer = serde_json::to_vec(&Answer::Refused(why.into())).expect("serializable");
        let _ = self.stream.write_all(&answer);
    }

    /// Sends `fd` and what goes with it. An error means the successor did not get them.
    pub fn give(mut self, given: Given, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let answer = serde_json::to_vec(&Answer::Given(given)).expect("serializable");
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = SendAncillaryBuffer::new(&mut space);
        let fds = [fd.as_fd()];
        ancillary.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = rustix::net::sendmsg(
            &self.stream,
            &[std::io::IoSlice::new(&answer)],
            &mut ancillary,
            SendFlags::empty(),
        )?;
        self.stream.write_all(&answer[sent..])?;
        self.stream.shutdown(std::net::Shutdown::Write)
    }
}

/// The service manager's file-descriptor store (systemd's `FileDescriptorStoreMax`): the
/// connection's fd is kept there, so that when the daemon dies (a crash, `kill -9`) the
/// restarted one is handed the same connection and processes using the mount wait for it
/// instead of getting ENOTCONN. Without a service manager (no `NOTIFY_SOCKET`) these do
/// nothing.
pub mod fd_store {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use std::path::Path;

    use tracing::{info, warn};

    /// The fd's name in the store: the mount's device number, so that a restarted daemon
    /// can tell whether the connection is still the one mounted.
    fn name(dev: u64) -> String {
        format!("fuse-{dev}")
    }

    /// Sends `state` (sd_notify(3) lines) and `fd` to the service manager, if one listens
    /// (`NOTIFY_SOCKET`). Never waits: a manager that does not read its socket must not
    /// hold the daemon up, so a full socket drops the message with a warning.
    pub fn notify(state: &str, fd: Option<BorrowedFd<'_>>) {
        if let Err(e) = try_notify(state, fd) {
            warn!(error = %e, state, "cannot notify the service manager");
        }
    }

    fn try_notify(state: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(());
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        // `@name` is a socket in the abstract namespace.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        let socket = UnixDatagram::unbound()?;
        socket.connect_addr(&addr)?;
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = rustix::net::SendAncillaryBuffer::new(&mut space);
        let fds = fd.map(|fd| [fd]);
        if let Some(fds) = &fds {
            ancillary.push(rustix::net::SendAncillaryMessage::ScmRights(fds));
        }
        rustix::net::sendmsg(
            &socket,
            &[std::io::IoSlice::new(state.as_bytes())],
            &mut ancillary,
            rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
        )?;
        Ok(())
    }

    /// Puts the connection of the mount with device number `dev` in the store.
    pub fn keep(fd: BorrowedFd<'_>, dev: u64) {
        notify(&format!("FDSTORE=1\nFDNAME={}\n", name(dev)), Some(fd));
    }

    /// Takes the connection out of the store: the mount is gone for good.
    pub fn forget(dev: u64) {
        notify(&format!("FDSTOREREMOVE=1\nFDNAME={}\n", name(dev)), None);
    }

    /// The connection the service manager kept for this daemon, if it is still the one
    /// mounted at `mount`; a stale one is dropped from the store.
    pub fn take(mount: &Path) -> Option<OwnedFd> {
        let fds = sd_notify::listen_fds_with_names(false).ok()?;
        let mounted = crate::fuse::mount::mount_dev(mount);
        let mut found = None;
        for (raw, fd_name) in fds {
            let Some(dev) = fd_name
                .strip_prefix("fuse-")
                .and_then(|d| d.parse::<u64>().ok())
            else {
                continue;
            };
            // SAFETY: the service manager passed this fd to this process (LISTEN_PID is
            // ours), and nothing else here took it.
            #[allow(unsafe_code)]
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if Some(dev) == mounted && found.is_none() {
                info!(mount = %mount.display(), "the service manager kept the FUSE connection of the previous daemon");
                found = Some(fd);
            } else {
                warn!(mount = %mount.display(), dev, "the kept FUSE connection is not the one mounted; dropping it");
                forget(dev);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fd_and_a_long_state_cross_the_socket_a_wrong_ask_is_refused_and_no_listener_is_none()
     {
        let dir = tempfile::tempdir().unwrap();
        let offer = Offer::bind(dir.path()).unwrap();
        let file = tempfile::tempfile().unwrap();
        let ino = file.metadata().unwrap().ino();
        // Far more than one read's worth (64 KiB) of open files.
        let open: Vec<(u64, usize)> = (1..=20_000).map(|i| (i, (i % 3) as usize + 1)).collect();

        let data = dir.path().to_path_buf();
        let asker = tokio::task::spawn_blocking(move || take_over(&data, Path::new("/mnt/x")));
        let asked = offer.next().await.unwrap();
        assert_eq!(asked.mount, Path::new("/mnt/x"));
        let given = Given {
            pid: 42,
            mount: "/mnt/x".into(),
            resume: Resume {
                session: 7,
                epoch: 3,
                open: Some(open.clone()),
            },
        };
        tokio::task::block_in_place(|| asked.give(given, file.as_fd())).unwrap();
        let (got, fd) = asker.await.unwrap().unwrap().expect("a daemon listens");
        assert_eq!((got.pid, got.resume.session, got.resume.epoch), (42, 7, 3));
        assert_eq!(got.resume.open, Some(open));
        assert_eq!(
            rustix::fs::fstat(&fd).unwrap().st_ino,
            ino,
            "the same file came across"
        );

        let data = dir.path().to_path_buf();
        let asker = tokio::task::spawn_blocking(move || take_over(&data, Path::new("/mnt/y")));
        offer.next().await.unwrap().refuse("not this one");
        match asker.await.unwrap() {
            Err(HandoverError::Refused(why)) => assert_eq!(why, "not this one"),
            other => panic!("expected a refusal, got {other:?}"),
        }

        // A garbled request is ignored and the next one served.
        let mut junk = UnixStream::connect(socket_path(dir.path())).unwrap();
        junk.write_all(b"{not json").unwrap();
        junk.shutdown(std::net::Shutdown::Write).unwrap();
        let data = dir.path().to_path_buf();
        let asker = tokio::task::spawn_blocking(move || take_over(&data, Path::new("/mnt/z")));
        let asked = offer.next().await.unwrap();
        assert_eq!(asked.mount, Path::new("/mnt/z"));
        asked.refuse("bye");
        assert!(asker.await.unwrap().is_err());

        drop(offer);
        assert!(
            !socket_path(dir.path()).exists(),
            "the socket goes with the offer"
        );
        assert!(
            take_over(dir.path(), Path::new("/mnt/x"))
                .unwrap()
                .is_none()
        );
    }
}
