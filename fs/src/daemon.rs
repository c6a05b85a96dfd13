//! Running a node in the foreground: start, mount, serve the admin socket, and on SIGINT or
//! SIGTERM commit buffered writes and unmount.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument, info, warn};

use shoal_fs::node::{Node, NodeOptions};
use shoal_fs::{admin, fuse, handover};

pub struct DaemonArgs<'a> {
    pub data: &'a Path,
    pub mount: &'a Path,
    pub options: NodeOptions,
    pub fuse_threads: usize,
    /// Honour setuid bits and device nodes in the mount (off: `nosuid,nodev`).
    pub allow_suid_dev: bool,
    /// Where to serve the Docker volume plugin, if anywhere.
    pub plugin_socket: Option<&'a Path>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

pub async fn run(args: DaemonArgs<'_>) -> anyhow::Result<()> {
    shoal_raft::failpoint::arm_from_env()?;
    let mount_abs = std::path::absolute(args.mount)?;
    // The connection the service manager kept when the last daemon died, or else the one a
    // daemon serving this data directory hands over instead of refusing us.
    let taken = match handover::fd_store::take(&mount_abs) {
        Some(fd) => {
            let (session, epoch) = shoal_fs::node::recorded_session(args.data).unwrap_or_else(|| {
                warn!("no session recorded in the data directory: the locks of processes using the mount are lost");
                (rand::random::<u64>() | 1, 0)
            });
            let given = handover::Given {
                pid: 0,
                mount: mount_abs.clone(),
                resume: shoal_fs::node::Resume {
                    session,
                    epoch,
                    open: None,
                },
            };
            Some((given, fd))
        }
        // Only a live daemon can hand over: one that died with a thread stuck in the kernel
        // still holds its sockets open, and would never answer.
        None => match fuse::mount::lock_holder(args.data) {
            Some(pid) if fuse::mount::process_alive(pid) => {
                handover::take_over(args.data, &mount_abs)?
            }
            _ => None,
        },
    };
    match &taken {
        Some((given, _)) if given.pid == 0 => {
            info!(mount = %given.mount.display(), "serving on the FUSE connection the service manager kept");
        }
        Some((given, _)) => {
            info!(pid = given.pid, mount = %given.mount.display(), "the running daemon handed its mount over; starting once it has exited");
            wait_gone(given.pid).await?;
        }
        None => {
            // A predecessor stuck dying on its own mount would hang the checks below.
            fuse::mount::release_stuck_predecessor(args.data, args.mount)
                .context("clearing the previous daemon's mount")?;
            // Check the mount point before starting anything, so a bad --mount fails fast.
            fuse::mount::prepare(args.mount)?;
        }
    }
    let metrics = match args.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "--metrics {addr}: cannot listen there (in use, or not an address of this host?)"
            )
        })?),
        None => None,
    };
    let mut options = args.options;
    options.resume = taken.as_ref().map(|(given, _)| given.resume.clone());
    let node = Node::start(args.data, options).await?;
    let rt = tokio::runtime::Handle::current();
    let mut handle = match taken {
        Some((given, fd)) => fuse::mount::resume(
            node.clone(),
            fd,
            &given.mount,
            rt.clone(),
            args.fuse_threads,
            args.allow_suid_dev,
        )?,
        None => fuse::mount(
            node.clone(),
            args.mount,
            rt.clone(),
            args.fuse_threads,
            args.allow_suid_dev,
        )?,
    };
    let admin = tokio::spawn(
        admin::serve(node.clone(), Some(handle.mountpoint.clone())).instrument(node.span().clone()),
    );
    let plugin = args.plugin_socket.map(|socket| {
        let (node, mount, socket) = (node.clone(), handle.mountpoint.clone(), socket.to_path_buf());
        let span = node.span().clone();
        tokio::spawn(
            async move {
                if let Err(e) = shoal_fs::plugin::serve(node, mount, socket.clone()).await {
                    tracing::error!(socket = %socket.display(), error = %e, "the Docker volume plugin stopped");
                }
            }
            .instrument(span),
        )
    });
    if let Some(listener) = metrics {
        let addr = listener.local_addr().ok();
        let node = node.clone();
        let span = node.span().clone();
        tokio::spawn(
            async move {
                if let Err(e) = shoal_fs::metrics::serve(node, listener).await {
                    tracing::error!(addr = ?addr, error = %e, "the metrics endpoint stopped");
                }
            }
            .instrument(span),
        );
        info!(addr = ?addr, "serving Prometheus metrics on /metrics");
    }
    let offer = handover::Offer::bind(args.data).with_context(|| {
        format!(
            "listening for a successor on {}",
            handover::socket_path(args.data).display()
        )
    })?;
    info!(mount = %handle.mountpoint.display(), data = %args.data.display(), "shoal is serving");
    if let Some(dev) = handle.dev() {
        handover::fd_store::keep(handle.fd(), dev);
    }
    // Under systemd (Type=notify): this process is the service's main one now, also when it
    // took over from another.
    handover::fd_store::notify(&format!("MAINPID={}\nREADY=1\n", std::process::id()), None);

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut fatal = None;
    loop {
        let asked = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                match start_successor() {
                    Ok(pid) => info!(successor = pid, "SIGHUP: started a successor, which this daemon hands its mount to"),
                    Err(e) => warn!(error = %e, "SIGHUP: cannot start a successor; serving on"),
                }
                continue;
            }
            asked = offer.next() => match asked {
                Ok(asked) => asked,
                Err(e) => { warn!(error = %e, "the hand-over socket failed"); continue; }
            },
            _ = poll.tick() => {
                if handle.is_finished() {
                    warn!(mount = %handle.mountpoint.display(), "the mount went away (unmounted from outside); shutting down");
                    break;
                }
                // A Raft core that stopped (its log's disk failed a write) never serves again:
                // every metadata operation would answer EIO for as long as the process lives.
                // Exit non-zero instead, so that systemd restarts the daemon, which replays
                // its log and catches up from the others.
                if let Err(e) = node.raft.metrics().borrow().running_state.clone() {
                    tracing::error!(error = %e, "the Raft core stopped; shutting down so that the service manager restarts this daemon");
                    fatal = Some(e);
                    break;
                }
                continue;
            }
        };
        if !same_mount(&asked.mount, &handle.mountpoint) {
            let why = format!(
                "a shoal daemon already serves this data directory, mounted at {}; to replace it without unmounting, start the new one with --mount {}",
                handle.mountpoint.display(),
                handle.mountpoint.display()
            );
            warn!("{why}");
            asked.refuse(&why);
            continue;
        }
        let mountpoint = handle.mountpoint.clone();
        match hand_off(&node, handle, asked).await {
            Handoff::Done => {
                node.shutdown().await;
                admin.abort();
                if let Some(task) = plugin {
                    task.abort();
                }
                drop(offer);
                info!("handed the mount over; exiting");
                return Ok(());
            }
            Handoff::Failed(fd, e) => {
                warn!(error = %e, "the successor did not take the mount; serving on");
                handle = fuse::mount::resume(
                    node.clone(),
                    fd,
                    &mountpoint,
                    rt.clone(),
                    args.fuse_threads,
                    args.allow_suid_dev,
                )?;
            }
        }
    }
    // Unmount first so no new writes arrive, then commit what is buffered.
    if let Some(dev) = handle.dev() {
        handover::fd_store::forget(dev);
    }
    tokio::task::block_in_place(|| handle.unmount());
    node.shutdown().await;
    admin.abort();
    if let (Some(task), Some(socket)) = (plugin, args.plugin_socket) {
        task.abort();
        let _ = std::fs::remove_file(socket);
    }
    let _ = std::fs::remove_file(admin::socket_path(args.data));
    match fatal {
        Some(e) => Err(anyhow::anyhow!(
            "the Raft core stopped ({e}): check the data disk ({}); starting the daemon again replays its log",
            args.data.display()
        )),
        None => Ok(()),
    }
}

/// Waits until the daemon that handed its mount over has exited (it holds the data directory
/// until then).
async fn wait_gone(pid: i32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while fuse::mount::process_alive(pid) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the daemon that handed its mount over (pid {pid}) has not exited after 120 s; its log says why"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Whether a successor asking for `asked` means this daemon's mount at `ours` (canonical).
fn same_mount(asked: &Path, ours: &Path) -> bool {
    asked == ours || std::fs::canonicalize(asked).is_ok_and(|p| p == ours)
}

enum Handoff {
    Done,
    /// The successor did not take the connection: serve it on.
    Failed(std::os::fd::OwnedFd, std::io::Error),
}

/// Stops serving the mount, waits for the requests already taken to be answered, and sends
/// the connection with this node's session and open files to the successor.
async fn hand_off(node: &Arc<Node>, handle: fuse::MountHandle, asked: handover::Asked) -> Handoff {
    info!(mount = %handle.mountpoint.display(), "a successor asked for the mount; handing it over");
    let mount = handle.mountpoint.clone();
    node.start_handing_over();
    let stopped = tokio::task::block_in_place(|| handle.hand_off());
    // Requests dispatched to tokio still hold their replies; each is answered before the
    // connection goes (an unanswered one would stay so forever).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while node.metrics.fuse_in_flight() > 0 {
        if std::time::Instant::now() > deadline {
            warn!(
                in_flight = node.metrics.fuse_in_flight(),
                "requests still unanswered after 60 s; handing over anyway (they are answered from here before exit)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Lock waits ended unanswered: the kernel queues them again, for the successor.
    let fd = stopped.release_waits();
    let given = handover::Given {
        pid: std::process::id() as i32,
        mount,
        resume: shoal_fs::node::Resume {
            session: node.session(),
            epoch: node.epoch(),
            open: Some(node.open_counts()),
        },
    };
    match tokio::task::block_in_place(|| asked.give(given, std::os::fd::AsFd::as_fd(&fd))) {
        Ok(()) => Handoff::Done,
        Err(e) => {
            node.stop_handing_over();
            Handoff::Failed(fd, e)
        }
    }
}

/// Starts this program again with the same arguments; it asks for the mount on start.
fn start_successor() -> std::io::Result<u32> {
    // After an upgrade /proc/self/exe names the old, deleted binary; the path this one was
    // started by names the new one.
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    let exe = match argv0 {
        Some(p) if p.components().count() > 1 => p,
        _ => std::env::current_exe()?,
    };
    let child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    Ok(child.id())
}
