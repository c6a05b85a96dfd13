//! A cluster of `shoal` daemons on loopback, started with `shoal local up`, taken down and
//! unmounted on drop, its logs kept when a test fails. Shared by the `it` and `failpoints`
//! test targets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::testkit::{is_mounted, shoal};

pub(crate) struct LocalCluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) base_port: u16,
    env: Vec<(String, String)>,
    /// A node whose data directory is a small filesystem of its own, unmounted on drop.
    small_disk: Option<u32>,
    /// Node K serves Prometheus metrics on 127.0.0.1:(this + K), when set.
    metrics_port: Option<u16>,
}

/// A base port whose nine ports above are free now. Tests run in parallel, and beside the
/// ci/ scripts' clusters (which take theirs below 20,000): each cluster gets its own ports,
/// drawn from 20,000–39,999 until none of them is taken.
fn free_base_port() -> u16 {
    loop {
        let base = 20_000 + (rand::random::<u16>() % 20_000) / 10 * 10;
        let free = (1..10).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
}

impl LocalCluster {
    pub(crate) fn up(nodes: u32) -> LocalCluster {
        LocalCluster::up_with_env(nodes, &[])
    }

    /// A cluster whose daemons run with extra environment variables.
    pub(crate) fn up_with_env(nodes: u32, env: &[(&str, &str)]) -> LocalCluster {
        let dir = tempfile::tempdir().unwrap();
        let base_port = free_base_port();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = LocalCluster {
            dir,
            base_port,
            env,
            small_disk: None,
            metrics_port: None,
        };
        c.local_up(nodes);
        c
    }

    /// A cluster whose daemons serve Prometheus metrics (`LocalCluster::scrape`).
    pub(crate) fn up_with_metrics(nodes: u32) -> LocalCluster {
        let base_port = free_base_port();
        let mut metrics = free_base_port();
        while metrics == base_port {
            metrics = free_base_port();
        }
        let c = LocalCluster {
            dir: tempfile::tempdir().unwrap(),
            base_port,
            env: Vec::new(),
            small_disk: None,
            metrics_port: Some(metrics),
        };
        c.local_up(nodes);
        c
    }

    /// Node `k`'s metrics: `GET /metrics` over plain HTTP/1.1, every sample line as
    /// `name{labels}` → value; an error when the node does not answer.
    pub(crate) fn scrape(
        &self,
        k: u32,
    ) -> std::io::Result<std::collections::BTreeMap<String, f64>> {
        use std::io::{Read, Write};
        let port = self.metrics_port.expect("a cluster started with metrics") + k as u16;
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("metrics answered {head:?}")));
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// A cluster whose node `k` keeps its data on a tmpfs of `bytes`, so a test can fill it.
    pub(crate) fn up_with_small_disk(nodes: u32, k: u32, bytes: u64) -> LocalCluster {
        let mut c = LocalCluster {
            dir: tempfile::tempdir().unwrap(),
            base_port: free_base_port(),
            env: Vec::new(),
            small_disk: None,
            metrics_port: None,
        };
        fs::create_dir_all(c.data(k)).unwrap();
        let options = std::ffi::CString::new(format!("size={bytes},mode=0700")).unwrap();
        rustix::mount::mount(
            "tmpfs",
            c.data(k),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(options.as_c_str()),
        )
        .unwrap();
        c.small_disk = Some(k);
        c.local_up(nodes);
        c
    }

    pub(crate) fn local_up(&self, nodes: u32) {
        let out = self.try_local_up(nodes, &[]);
        assert!(
            out.status.success(),
            "local up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `shoal local up`, which starts the nodes that are down, with extra environment for
    /// them; what it said.
    pub(crate) fn try_local_up(&self, nodes: u32, env: &[(&str, &str)]) -> std::process::Output {
        Command::new(shoal())
            .args([
                "local",
                "up",
                "--nodes",
                &nodes.to_string(),
                "--base-port",
                &self.base_port.to_string(),
                "--dir",
            ])
            .arg(self.dir.path())
            .args(self.metrics_port.map(|p| format!("--metrics-port={p}")))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    pub(crate) fn node(&self, k: u32) -> PathBuf {
        self.dir.path().join(format!("node-{k}"))
    }

    pub(crate) fn mnt(&self, k: u32) -> PathBuf {
        self.node(k).join("mnt")
    }

    pub(crate) fn data(&self, k: u32) -> PathBuf {
        self.node(k).join("data")
    }

    /// Node `k`'s QUIC address.
    pub(crate) fn addr(&self, k: u32) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.base_port + k as u16).into()
    }

    pub(crate) fn pid(&self, k: u32) -> i32 {
        fs::read_to_string(self.node(k).join("daemon.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Whether node `k`'s daemon process is still alive (a zombie is not: see
    /// `release_stuck_predecessor`).
    pub(crate) fn alive(&self, k: u32) -> bool {
        shoal_fs::fuse::mount::process_alive(self.pid(k))
    }

    pub(crate) fn kill9(&self, k: u32) {
        let pid = rustix::process::Pid::from_raw(self.pid(k)).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive(k) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops node `k`'s daemon the way systemd does (SIGTERM) and waits until it is gone.
    pub(crate) fn stop(&self, k: u32) {
        let pid = rustix::process::Pid::from_raw(self.pid(k)).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.alive(k) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.alive(k), "node {k} stopped within 30 s of SIGTERM");
    }

    /// Runs `shoal ARGS --data` with node `k`'s data directory.
    pub(crate) fn shoal_at(&self, k: u32, args: &[&str]) -> std::process::Output {
        Command::new(shoal())
            .args(args)
            .arg("--data")
            .arg(self.data(k))
            .output()
            .unwrap()
    }

    pub(crate) fn leader(&self, k: u32) -> Option<u64> {
        let out = Command::new(shoal())
            .arg("status")
            .arg("--json")
            .arg("--data")
            .arg(self.data(k))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["leader"].as_u64()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new(shoal())
            .arg("local")
            .arg("down")
            .arg("--dir")
            .arg(self.dir.path())
            .output();
        for k in 1..=8 {
            if is_mounted(&self.mnt(k)) {
                let _ = shoal_fs::fuse::mount::detach(&self.mnt(k));
            }
        }
        if let Some(k) = self.small_disk {
            let _ = shoal_fs::fuse::mount::detach(&self.data(k));
        }
        // A failed test keeps the daemons' logs, which say what the cluster was doing.
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!(
                "shoal-failed-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            for k in 1..=8 {
                let log = self.node(k).join("daemon.log");
                if log.exists() && fs::create_dir_all(&keep).is_ok() {
                    let _ = fs::copy(&log, keep.join(format!("node-{k}.log")));
                }
            }
            eprintln!("daemon logs kept in {}", keep.display());
        }
    }
}

/// Waits until `f` holds, for up to 10 s: these tests say what becomes visible, not how fast.
pub(crate) fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(10), f)
}

pub(crate) fn eventually_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn read(path: &Path) -> Option<Vec<u8>> {
    fs::read(path).ok()
}
