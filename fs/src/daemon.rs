//! Running a node in the foreground: start, mount, serve the admin socket, and on SIGINT or
//! SIGTERM commit buffered writes and unmount.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument, info, warn};

use shoal_fs::node::{Node, NodeOptions};
use shoal_fs::{admin, fuse};

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
    // A predecessor stuck dying on its own mount would hang the checks below.
    fuse::mount::release_stuck_predecessor(args.data, args.mount)
        .context("clearing the previous daemon's mount")?;
    // Check the mount point before starting anything, so a bad --mount fails fast.
    fuse::mount::prepare(args.mount)?;
    shoal_raft::failpoint::arm_from_env()?;
    let metrics = match args.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "--metrics {addr}: cannot listen there (in use, or not an address of this host?)"
            )
        })?),
        None => None,
    };
    let node = Node::start(args.data, args.options).await?;
    let handle = fuse::mount(
        node.clone(),
        args.mount,
        tokio::runtime::Handle::current(),
        args.fuse_threads,
        args.allow_suid_dev,
    )?;
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
    info!(mount = %handle.mountpoint.display(), data = %args.data.display(), "shoal is serving");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut fatal = None;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
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
            }
        }
    }
    // Unmount first so no new writes arrive, then commit what is buffered.
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
