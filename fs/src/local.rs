//! `shoal local up|down`: a cluster on this machine, for trying shoal out.
//!
//! Each node lives in `DIR/node-K/` with its data in `data/`, its mount at `mnt/`, its log in
//! `daemon.log` and its pid in `daemon.pid`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use shoal_fs::admin::{self, AdminReply, AdminRequest};
use shoal_fs::fuse::mount::{detach, mount_entry};
use shoal_fs::node;

#[derive(Subcommand)]
pub enum LocalCommand {
    /// Start a local cluster and return once every node is mounted and healthy
    Up {
        /// How many nodes
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// Where the nodes keep their data, mounts and logs
        #[arg(long, default_value = "/tmp/shoal")]
        dir: PathBuf,
        /// Node K listens on 127.0.0.1:(BASE_PORT + K)
        #[arg(long, default_value_t = 7440)]
        base_port: u16,
        /// Serve each node's Prometheus metrics: node K on http://127.0.0.1:(PORT + K)/metrics
        #[arg(long, value_name = "PORT")]
        metrics_port: Option<u16>,
        #[command(flatten)]
        tunables: crate::Tunables,
    },
    /// Stop the local cluster's daemons and unmount their mounts
    Down {
        #[arg(long, default_value = "/tmp/shoal")]
        dir: PathBuf,
    },
}

pub fn run(cmd: LocalCommand) -> anyhow::Result<()> {
    match cmd {
        LocalCommand::Up {
            nodes,
            dir,
            base_port,
            metrics_port,
            tunables,
        } => up(
            nodes,
            &dir,
            Ports {
                base: base_port,
                metrics: metrics_port,
            },
            tunables,
        ),
        LocalCommand::Down { dir } => down(&dir),
    }
}

struct NodeDir {
    root: PathBuf,
}

impl NodeDir {
    fn new(dir: &Path, k: u32) -> NodeDir {
        NodeDir {
            root: dir.join(format!("node-{k}")),
        }
    }
    fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    fn mnt(&self) -> PathBuf {
        self.root.join("mnt")
    }
    fn log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
    fn pid_file(&self) -> PathBuf {
        self.root.join("daemon.pid")
    }
    /// The node's daemon: the one started here, or the successor it handed its mount to
    /// (SIGHUP), which holds the data directory's lock now.
    fn pid(&self) -> Option<i32> {
        let started = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok();
        match started {
            Some(pid) if alive(pid) => Some(pid),
            _ => shoal_fs::fuse::mount::lock_holder(&self.data()).or(started),
        }
    }
}

fn alive(pid: i32) -> bool {
    shoal_fs::fuse::mount::process_alive(pid)
}

/// Whether a node's daemon answers on its admin socket.
fn serving(nd: &NodeDir, rt: &tokio::runtime::Runtime) -> bool {
    let data = nd.data();
    let ask = admin::request(&data, AdminRequest::Status);
    matches!(
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), ask).await }),
        Ok(Ok(AdminReply::Status(_)))
    )
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where node K listens: QUIC on `base + K`, metrics (if served) on `metrics + K`.
struct Ports {
    base: u16,
    metrics: Option<u16>,
}

impl Ports {
    fn metrics(&self, k: u32) -> Option<std::net::SocketAddr> {
        self.metrics.map(|m| ([127, 0, 0, 1], m + k as u16).into())
    }
}

fn up(nodes: u32, dir: &Path, ports: Ports, tunables: crate::Tunables) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 64 {
        bail!("--nodes must be from 1 to 64");
    }
    let base_port = ports.base;
    if u32::from(base_port) + nodes > 65535 {
        bail!("--base-port {base_port} leaves no room for {nodes} nodes");
    }
    if let Some(m) = ports.metrics
        && u32::from(m) + nodes > 65535
    {
        bail!("--metrics-port {m} leaves no room for {nodes} nodes");
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "shoal mounts FUSE filesystems for all users, which needs root: run `sudo shoal local up …`"
        );
    }
    let exe = std::env::current_exe().context("finding the shoal executable")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addr = |k: u32| -> std::net::SocketAddr { ([127, 0, 0, 1], base_port + k as u16).into() };
    // Nodes that exist already start together: a restarted cluster needs a majority of its
    // voters up before any of them is ready. New nodes then join through node 1, one by one.
    let mut running = Vec::new();
    let mut fresh = Vec::new();
    for k in 1..=nodes {
        let nd = NodeDir::new(dir, k);
        if let Some(pid) = nd.pid().filter(|p| alive(*p)) {
            if serving(&nd, &rt) {
                println!("node-{k} is already running (pid {pid})");
                continue;
            }
            // A daemon that was killed may take a moment to go away.
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                bail!(
                    "node-{k} (pid {pid}) is running but does not answer on its admin socket; stop it first"
                );
            }
        }
        if node::ClusterConfig::load(&nd.data()).is_ok() {
            running.push((k, spawn_daemon(&exe, &nd, ports.metrics(k), &tunables)?));
        } else {
            fresh.push(k);
        }
    }
    for (k, child) in running {
        wait_ready(child, &NodeDir::new(dir, k), k, &rt)?;
        println!(
            "node-{k} is up: mount {}, listening on {}{}",
            NodeDir::new(dir, k).mnt().display(),
            addr(k),
            metrics_note(ports.metrics(k))
        );
    }
    for k in fresh {
        let nd = NodeDir::new(dir, k);
        std::fs::create_dir_all(&nd.root)
            .with_context(|| format!("creating {}", nd.root.display()))?;
        {
            if k == 1 {
                rt.block_on(node::init(
                    &nd.data(),
                    4 << 20,
                    Some(addr(1)),
                    tunables.cert_validity(),
                ))?;
            } else {
                let token_path = shoal_fs::cluster::token_path(&NodeDir::new(dir, 1).data());
                let token = std::fs::read_to_string(&token_path)
                    .with_context(|| {
                        format!("reading node-1's join token {}", token_path.display())
                    })?
                    .trim()
                    .parse()?;
                rt.block_on(shoal_fs::node::join::join(
                    &nd.data(),
                    token,
                    addr(1),
                    addr(k),
                    false,
                ))?;
            }
        }
        let child = spawn_daemon(&exe, &nd, ports.metrics(k), &tunables)?;
        wait_ready(child, &nd, k, &rt)?;
        println!(
            "node-{k} is up: mount {}, data {}, listening on {}{}",
            nd.mnt().display(),
            nd.data().display(),
            addr(k),
            metrics_note(ports.metrics(k))
        );
    }
    let first = NodeDir::new(dir, 1);
    println!();
    println!("Try it:");
    println!("  echo hello > {}/hello.txt", first.mnt().display());
    if nodes > 1 {
        println!(
            "  cat {}/hello.txt",
            NodeDir::new(dir, nodes).mnt().display()
        );
        println!("  shoal node ls --data {}", first.data().display());
    }
    println!("  shoal status --data {}", first.data().display());
    println!("  shoal local down --dir {}", dir.display());
    Ok(())
}

fn metrics_note(metrics: Option<std::net::SocketAddr>) -> String {
    metrics
        .map(|m| format!(", metrics http://{m}/metrics"))
        .unwrap_or_default()
}

/// Starts a node's daemon in the background.
fn spawn_daemon(
    exe: &Path,
    nd: &NodeDir,
    metrics: Option<std::net::SocketAddr>,
    tunables: &crate::Tunables,
) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(nd.log())
        .with_context(|| format!("creating {}", nd.log().display()))?;
    let child = Command::new(exe)
        .arg("daemon")
        .arg("--data")
        .arg(nd.data())
        .arg("--mount")
        .arg(nd.mnt())
        .arg("--plugin-socket")
        .arg(nd.root.join("plugin.sock"))
        .args(metrics.map(|m| format!("--metrics={m}")))
        .args(tunables.args())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    std::fs::write(nd.pid_file(), child.id().to_string())?;
    Ok(child)
}

/// Waits until a daemon serves its mount and knows a leader.
fn wait_ready(
    child: std::process::Child,
    nd: &NodeDir,
    k: u32,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    wait_serving(
        child,
        &format!("node-{k}"),
        &nd.data(),
        &nd.mnt(),
        &nd.log(),
        rt,
    )
}

/// Waits until the daemon `child` serves `mnt` and its node knows a leader; when it exits
/// first, or takes more than 60 s, fails with the end of its `log`.
pub(crate) fn wait_serving(
    mut child: std::process::Child,
    name: &str,
    data: &Path,
    mnt: &Path,
    log: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    // A node joining a large cluster installs a snapshot first (40 s at a million files).
    const READY_WITHIN: Duration = Duration::from_secs(600);
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} exited ({status}) before it was ready; its log {} ends with:\n{}",
                log.display(),
                tail(log, 15)
            );
        }
        let healthy = mount_entry(mnt).is_some()
            && matches!(
                rt.block_on(admin::request(data, AdminRequest::Status)),
                Ok(AdminReply::Status(ref s)) if s.leader.is_some()
            );
        if healthy {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not become ready in {} s; see {}",
                READY_WITHIN.as_secs(),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let mut found = false;
    for k in 1.. {
        let nd = NodeDir::new(dir, k);
        if !nd.root.exists() {
            break;
        }
        found = true;
        if let Some(pid) = nd.pid().filter(|p| alive(*p)) {
            let p = rustix::process::Pid::from_raw(pid).expect("positive pid");
            rustix::process::kill_process(p, rustix::process::Signal::TERM)
                .with_context(|| format!("stopping node-{k} (pid {pid})"))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                bail!(
                    "node-{k} (pid {pid}) did not stop within 30 s; see {}",
                    nd.log().display()
                );
            }
            println!("node-{k} stopped");
        }
        let _ = std::fs::remove_file(nd.pid_file());
        if mount_entry(&nd.mnt()).is_some() {
            detach(&nd.mnt()).with_context(|| format!("unmounting {}", nd.mnt().display()))?;
        }
    }
    if !found {
        bail!("no local cluster in {}", dir.display());
    }
    Ok(())
}
