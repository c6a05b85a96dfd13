//! Test helpers: an in-process node in a temp dir, and a `shoal daemon` process with a mount
//! that is always unmounted, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_fs::NodeOptions;
use shoal_fs::node::{self, Node};

pub const BLOCK: u32 = 1 << 20;

/// An initialized data directory in a temp dir.
pub struct DataDir {
    pub dir: tempfile::TempDir,
}

impl DataDir {
    pub async fn new() -> DataDir {
        let dir = tempfile::tempdir().unwrap();
        node::init(
            &dir.path().join("data"),
            BLOCK,
            None,
            shoal_fs::cluster::CERT_VALIDITY,
        )
        .await
        .unwrap();
        DataDir { dir }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn start(&self) -> Arc<Node> {
        let options = NodeOptions {
            gc_grace: Duration::ZERO,
            ..NodeOptions::default()
        };
        Node::start(&self.data(), options).await.unwrap()
    }
}

/// Stops a node and waits until every reference is gone, so the data dir can be reopened.
pub async fn stop(node: Arc<Node>) {
    node.shutdown().await;
    node::release(node).await;
}

pub fn shoal() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}

pub fn is_mounted(path: &Path) -> bool {
    shoal_fs::fuse::mount::mount_entry(path).is_some()
}

/// A `shoal daemon` process serving a mount in a temp dir.
pub struct Daemon {
    pub root: tempfile::TempDir,
    child: Option<Child>,
    /// Extra environment for the daemon (fault knobs).
    env: Vec<(String, String)>,
    /// Whether the data directory is a filesystem of its own, unmounted on drop.
    data_mount: bool,
}

impl Daemon {
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn mnt(&self) -> PathBuf {
        self.root.path().join("mnt")
    }

    /// Initializes a data dir and starts a daemon on it.
    pub fn start() -> Daemon {
        Daemon::start_with_env(&[])
    }

    /// `start`, with extra environment variables for the daemon.
    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        Daemon::init_and_start(tempfile::tempdir().unwrap(), env, false)
    }

    /// `start`, with the data directory on a filesystem of its own of `bytes` (a tmpfs), so
    /// that a test can fill it.
    pub fn start_on_small_disk(bytes: u64) -> Daemon {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let options = std::ffi::CString::new(format!("size={bytes},mode=0700")).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &data,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(options.as_c_str()),
        )
        .unwrap();
        Daemon::init_and_start(root, &[], true)
    }

    fn init_and_start(root: tempfile::TempDir, env: &[(&str, &str)], data_mount: bool) -> Daemon {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Made first, so that a failing init still unmounts what was mounted (on drop).
        let mut d = Daemon {
            root,
            child: None,
            env,
            data_mount,
        };
        let out = Command::new(shoal())
            .args(["init", "--block-size", "1MiB", "--data"])
            .arg(d.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.restart();
        d
    }

    /// Where this daemon serves the Docker volume plugin.
    pub fn plugin_socket(&self) -> PathBuf {
        self.root.path().join("plugin.sock")
    }

    /// Starts the daemon (again) on the same data dir and waits until it serves the mount.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("daemon.log"))
            .unwrap();
        let child = Command::new(shoal())
            .arg("daemon")
            .arg("--data")
            .arg(self.data())
            .arg("--mount")
            .arg(self.mnt())
            .arg("--plugin-socket")
            .arg(self.plugin_socket())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("daemon exited early ({status}):\n{}", self.log());
            }
            // read_dir goes to the daemon: a dead mount left by a killed run answers ENOTCONN.
            if is_mounted(&self.mnt()) && std::fs::read_dir(self.mnt()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not mount in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits up to `limit` for the daemon to exit by itself; its exit status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL: the daemon gets no chance to flush or unmount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the daemon commits and unmounts.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("daemon did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Drops the kernel's page and dentry caches, so reads come from the daemon.
    pub fn drop_caches() {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_quietly();
        }
        if is_mounted(&self.mnt()) {
            let _ = shoal_fs::fuse::mount::detach(&self.mnt());
        }
        if self.data_mount {
            let _ = shoal_fs::fuse::mount::detach(&self.data());
        }
    }
}

impl Daemon {
    fn stop_quietly(&mut self) -> Option<()> {
        let mut c = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(c.id() as i32)?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        for _ in 0..200 {
            if c.try_wait().ok()?.is_some() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        Some(())
    }
}

/// blake3 of a file's content.
pub fn hash_file(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}
