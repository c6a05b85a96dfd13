//! `mount -t fuse.shoal DATA MOUNTPOINT`: the mount(8) helper, for mounting shoal on a host
//! like NFS (an fstab line, a systemd mount unit).
//!
//! mount(8) runs `/sbin/mount.fuse.shoal DATA MOUNTPOINT [-sfnv] [-o OPTIONS]`, a link to the
//! `shoal` binary, which answers to that name (`main`). The helper turns the fstab options
//! into `shoal daemon` flags, checks them with the daemon's own parser, starts the daemon in
//! the background with its log in `DATA/daemon.log`, and returns once the mount serves and
//! the node knows a leader, or fails with the end of the log. `umount MOUNTPOINT` stops the
//! daemon (it leaves when its mount goes away).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// What mount(8) passed.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// The node's data directory (fstab's first field)
    pub data: PathBuf,
    /// Where to mount
    pub mountpoint: PathBuf,
    /// Options, comma-separated: cache_size=SIZE, fuse_threads=N, metrics=ADDR,
    /// plugin_socket=PATH, no_plugin, log=FILTER, gc_grace=DURATION, suid, dev; mount's own
    /// (_netdev, nofail, noauto, x-systemd.*, …) are left to mount and systemd
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Option<String>,
    /// Sloppy: ignore options shoal does not know instead of failing
    #[arg(short = 's')]
    pub sloppy: bool,
    /// Fake: check everything, start nothing
    #[arg(short = 'f')]
    pub fake: bool,
    /// Do not write /etc/mtab (there is none to write: accepted for mount's sake)
    #[arg(short = 'n')]
    pub no_mtab: bool,
    /// Say what is run
    #[arg(short = 'v')]
    pub verbose: bool,
    /// The filesystem type mount(8) was given (fuse.shoal)
    #[arg(short = 't', value_name = "TYPE")]
    pub fstype: Option<String>,
}

/// Options that are mount's, systemd's or the kernel's defaults: nothing for shoal to do.
const NOT_OURS: &[&str] = &[
    "defaults",
    "rw",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "nosuid",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "async",
];

/// The `shoal daemon` flags the options ask for, beside `--data` and `--mount`.
pub fn daemon_flags(options: &str, sloppy: bool) -> anyhow::Result<Vec<String>> {
    let mut flags = Vec::new();
    let (mut suid, mut dev) = (false, false);
    for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let flag = match (key, value) {
            (k, None) if NOT_OURS.contains(&k) => continue,
            (k, _) if k.starts_with("x-") || k == "comment" => continue,
            ("ro", None) => bail!(
                "option 'ro': shoal mounts read-write only; drop it (a container can still mount a volume read-only)"
            ),
            ("suid", None) => {
                suid = true;
                continue;
            }
            ("dev", None) => {
                dev = true;
                continue;
            }
            ("no_plugin", None) => "--no-plugin".to_string(),
            (
                "cache_size" | "fuse_threads" | "metrics" | "plugin_socket" | "log" | "gc_grace",
                Some(v),
            ) if !v.is_empty() => format!("--{}={v}", key.replace('_', "-")),
            (
                "cache_size" | "fuse_threads" | "metrics" | "plugin_socket" | "log" | "gc_grace",
                _,
            ) => {
                bail!("option '{opt}' needs a value: {key}=…")
            }
            _ if sloppy => {
                eprintln!("mount.fuse.shoal: ignoring option '{opt}' (-s)");
                continue;
            }
            _ => bail!(
                "unknown option '{opt}': shoal takes cache_size=SIZE, fuse_threads=N, metrics=ADDR, plugin_socket=PATH, no_plugin, log=FILTER, gc_grace=DURATION, suid and dev, beside mount's own (_netdev, nofail, noauto, x-systemd.*)"
            ),
        };
        flags.push(flag);
    }
    match (suid, dev) {
        (true, true) => flags.push("--allow-suid-dev".into()),
        (false, false) => {}
        _ => bail!(
            "options 'suid' and 'dev' go together (shoal honours setuid bits and device nodes both or neither): give both, or neither"
        ),
    }
    Ok(flags)
}

/// Starts the daemon for `args` and waits until it serves. `check` parses the daemon's
/// command line with the daemon's own parser (clap), so a bad value fails here, not in the
/// background.
pub fn mount(
    args: MountArgs,
    check: impl Fn(&[String]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if let Some(t) = args
        .fstype
        .as_deref()
        .filter(|t| !matches!(*t, "fuse.shoal" | "shoal"))
    {
        bail!("mount.fuse.shoal mounts type fuse.shoal, not {t}");
    }
    let data = std::path::absolute(&args.data)
        .with_context(|| format!("the data directory {}", args.data.display()))?;
    let mountpoint = std::path::absolute(&args.mountpoint)
        .with_context(|| format!("the mount point {}", args.mountpoint.display()))?;
    let mut line = vec![
        "daemon".to_string(),
        format!("--data={}", data.display()),
        format!("--mount={}", mountpoint.display()),
    ];
    line.extend(daemon_flags(
        args.options.as_deref().unwrap_or(""),
        args.sloppy,
    )?);
    check(&line)?;
    if !data.join(shoal_fs::node::CONFIG_FILE).exists() {
        bail!(
            "{} is not a shoal data directory: run `shoal init --data {0}` or `shoal join --data {0} …` first",
            data.display()
        );
    }
    if args.verbose || args.fake {
        eprintln!("mount.fuse.shoal: shoal {}", line.join(" "));
    }
    if args.fake {
        return Ok(());
    }
    let log_path = data.join("daemon.log");
    let log = log_file(&log_path)?;
    let exe = std::env::current_exe().context("finding the shoal executable")?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .args(&line)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the terminal's signals (Ctrl-C in the shell that ran mount)
        // do not reach it.
        .process_group(0)
        .spawn()
        .context("starting the shoal daemon")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    crate::local::wait_serving(
        child,
        "the shoal daemon",
        &data,
        &mountpoint,
        &log_path,
        &rt,
    )
}

/// The daemon's log, appended to (root only: it names files and peers).
fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the daemon's log {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::daemon_flags;

    #[test]
    fn fstab_options_become_daemon_flags() {
        let flags = daemon_flags(
            "defaults,_netdev,nofail,x-systemd.automount,cache_size=1GiB,no_plugin,metrics=127.0.0.1:9477,suid,dev",
            false,
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--cache-size=1GiB",
                "--no-plugin",
                "--metrics=127.0.0.1:9477",
                "--allow-suid-dev"
            ]
        );
        assert!(daemon_flags("", false).unwrap().is_empty());
        let err = daemon_flags("rw,frobnicate", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown option 'frobnicate'"), "{err}");
        assert!(daemon_flags("rw,frobnicate", true).unwrap().is_empty());
        let err = daemon_flags("ro", false).unwrap_err().to_string();
        assert!(err.contains("read-write only"), "{err}");
        let err = daemon_flags("suid", false).unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
        let err = daemon_flags("cache_size", false).unwrap_err().to_string();
        assert!(err.contains("needs a value"), "{err}");
    }
}
