//! The `shoal` command.

mod daemon;
mod helper;
mod local;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use shoal_fs::admin::{self, AdminReply, AdminRequest};
use shoal_fs::{NodeOptions, node};
use shoal_net::token::JoinToken;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "A distributed filesystem for Docker volumes",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new single-node cluster in a data directory
    Init {
        /// Where the node keeps its metadata and blocks
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The largest block file data is cut into
        #[arg(long, default_value = "4MiB")]
        block_size: ByteSize,
        /// Where this node listens for other nodes (UDP, QUIC). Without it the node stays alone;
        /// with it `shoal init` also makes the cluster's CA and prints a join token
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[command(flatten)]
        tunables: Tunables,
    },
    /// Join an existing cluster with a token from one of its nodes
    Join {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The join token (`shoal token show` on the node that ran `shoal init`)
        #[arg(long)]
        token: String,
        /// A cluster node's address (its --listen)
        #[arg(long)]
        peer: SocketAddr,
        /// Where this node listens for other nodes
        #[arg(long)]
        listen: SocketAddr,
        /// Join as a client: the node mounts, reads and writes, but stores no blocks and
        /// never votes (for hosts that only use volumes)
        #[arg(long)]
        client: bool,
    },
    /// Show the cluster's join token
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The cluster CA: rotate it, then retire the old one
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Cluster membership
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Run the node in the foreground and mount its filesystem
    ///
    /// Started while a daemon serves the same --data, it takes that daemon's mount over
    /// (session, open files and locks included) instead of mounting anew; SIGHUP makes a
    /// running daemon start such a successor (`systemctl reload shoal`). SIGTERM unmounts.
    Daemon {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Where to mount the filesystem (created if missing)
        #[arg(long, default_value = "/mnt/shoal")]
        mount: PathBuf,
        /// Memory for cached blocks
        #[arg(long, default_value = "256MiB")]
        cache_size: ByteSize,
        /// Threads reading kernel requests
        #[arg(long, default_value_t = 2)]
        fuse_threads: usize,
        /// Log filter, e.g. `info` or `shoal_fs=debug` (RUST_LOG wins when set)
        #[arg(long, default_value = "info,openraft=warn")]
        log: String,
        /// Where to serve the Docker volume plugin (Docker looks in /run/docker/plugins)
        #[arg(long, default_value = "/run/docker/plugins/shoal.sock")]
        plugin_socket: PathBuf,
        /// Do not serve the Docker volume plugin
        #[arg(long)]
        no_plugin: bool,
        /// Honour setuid bits and device nodes in volumes (by default the mount is nosuid,nodev:
        /// root in a container could otherwise leave a setuid-root binary for every host)
        #[arg(long)]
        allow_suid_dev: bool,
        /// How long a block no file names any more is kept before its file is deleted (the
        /// collector runs this often, at most every 30 s): e.g. 60s, 10m
        #[arg(long, env = "SHOAL_GC_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
        gc_grace: std::time::Duration,
        /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9477 (not served
        /// unless given; they name volumes and nodes, so keep them off public addresses)
        #[arg(long, env = "SHOAL_METRICS", value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        #[command(flatten)]
        tunables: Tunables,
    },
    /// Check every block a file references: read and verified on every node, and on the nodes
    /// its policy places it on. Exits non-zero if a block is lost or short of copies
    Fsck {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Copy a good copy to each node that should hold one and lacks it, then check again
        #[arg(long)]
        repair: bool,
    },
    /// Show the running node's state: Raft, mount, usage
    Status {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Print JSON instead of a table
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh every SECS seconds (default 1) until interrupted, with rates and the
        /// cluster's members
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1", value_parser = parse_watch)]
        watch: Option<f64>,
    },
    /// Docker volumes: create, list, inspect, remove (to the trash), restore, purge
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Mount a node's filesystem with its daemon in the background, returning once it serves:
    /// what `mount -t fuse.shoal DATA MOUNTPOINT -o OPTIONS` runs (as /sbin/mount.fuse.shoal, a
    /// link to shoal), for fstab and systemd mount units
    Mount(helper::MountArgs),
    /// Run a local cluster for trying shoal out
    Local {
        #[command(subcommand)]
        command: local::LocalCommand,
    },
    /// Tools for shoal's own tests
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
}

/// Knobs a cluster seldom needs, which the tests turn (through the environment, as they start
/// whole clusters): `shoal init`, `shoal daemon` and `shoal local up` take them.
#[derive(clap::Args, Clone, Copy, Debug)]
pub(crate) struct Tunables {
    /// Raft log entries between two snapshots of the metadata
    #[arg(long, env = "SHOAL_SNAPSHOT_EVERY", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,
    /// How long, in seconds, the node certificates this node signs are valid (on the node
    /// holding the CA); every node renews its own at half of it
    #[arg(long, env = "SHOAL_CERT_VALIDITY_SECS", default_value_t = 7 * 86_400, value_parser = clap::value_parser!(u64).range(2..))]
    pub cert_validity_secs: u64,
}

impl Tunables {
    pub fn cert_validity(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cert_validity_secs)
    }

    /// The same knobs as command-line arguments, for a daemon started by `shoal local up`.
    pub fn args(&self) -> [String; 4] {
        [
            "--snapshot-every".into(),
            self.snapshot_every.to_string(),
            "--cert-validity-secs".into(),
            self.cert_validity_secs.to_string(),
        ]
    }
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Arm a failpoint in the running daemon (a build with `--features failpoints`): ACTIONS
    /// in the `fail` crate's syntax, where `return` stops the daemon with SIGKILL there
    Failpoint {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// One of shoal_raft::failpoint::ALL, e.g. log-before-flush
        name: String,
        /// e.g. return, pause, off, sleep(500), 2*off->return
        actions: String,
    },
    /// Write the man pages (OUT/man/, one per command) and shell completions
    /// (OUT/completions/: bash, zsh, fish) that the Debian package installs
    Docs {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print the current join token (only the node that ran `shoal init` has it)
    Show {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
    },
    /// Make a new join token; every older token stops working (needs that node's daemon)
    Rotate {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new CA; members accept the old and the new until `retire`, and get certificates
    /// from the new one within seconds. Prints the new join token (older tokens stop working).
    /// Run on the node that ran `shoal init`
    Rotate {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
    },
    /// Stop accepting the old CA, once every member holds a certificate from the new one
    Retire {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List the cluster's nodes: id, address, role, liveness, data disk, labels
    Ls {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Add or remove node labels (used by volume placement, e.g. `placement=storage==ssd`)
    Label {
        #[command(subcommand)]
        command: LabelCommand,
    },
    /// Remove a node: from then on the cluster refuses it
    Rm {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The node's id (see `shoal node ls`)
        id: u64,
        /// Return once the node is removed, without waiting for the others to copy the
        /// blocks it held
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume: `shoal volume create data -o replicas=2 -o size=10GiB`
    Create {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        name: String,
        /// KEY=VALUE: replicas=N, size=SIZE, placement=KEY==VALUE[,KEY!=VALUE…]
        #[arg(short = 'o', long = "opt", value_parser = parse_opt)]
        opts: Vec<(String, String)>,
    },
    /// List volumes, with those in the trash
    Ls {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show a volume: size used, quota, replicas, placement, where it is mounted
    Inspect {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        name: String,
    },
    /// Move a volume no node mounts to the trash (what `docker volume rm` does)
    Rm {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        name: String,
    },
    /// Bring a removed volume back from the trash: the newest of that name, unless --id
    Restore {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        name: String,
        /// Which removed volume of that name (the ID column of `shoal volume ls`)
        #[arg(long)]
        id: Option<u64>,
        /// Restore it under this name (needed while a live volume holds its own)
        #[arg(long = "as", value_name = "NEW")]
        rename: Option<String>,
    },
    /// Forget the Docker mounts recorded for a node, on every volume: for a node whose
    /// containers are gone but whose Docker never unmounted (a crash or a reinstall), so that
    /// its volumes can be removed. A container still running there keeps writing into the
    /// volume, which may then go to the trash (nothing is deleted before the retention).
    ForgetMounts {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The node's id (see `shoal node ls`)
        #[arg(long)]
        node: u64,
    },
    /// Delete a removed volume in the trash, with all its files, for good
    Purge {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        name: String,
        /// Which removed volume of that name, when there are several (see `shoal volume ls`)
        #[arg(long)]
        id: Option<u64>,
    },
    /// Show or set how long removed volumes stay in the trash before they are purged
    /// (cluster-wide; default 24h): `shoal volume retention 7d`
    Retention {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// A duration such as 30m, 24h or 7d; 0s purges at the next sweep (every 10 s)
        #[arg(value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
}

fn parse_opt(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (e.g. replicas=2)"))
}

fn volume_command(command: VolumeCommand) -> anyhow::Result<()> {
    use admin::VolumeRequest as R;
    let (data, req, done) = match command {
        VolumeCommand::Create { data, name, opts } => (
            data,
            R::Create {
                name: name.clone(),
                options: opts.into_iter().collect(),
            },
            format!("volume {name} created"),
        ),
        VolumeCommand::Rm { data, name } => (
            data,
            R::Remove(name.clone()),
            format!(
                "volume {name} moved to the trash (`shoal volume restore {name}` brings it back)"
            ),
        ),
        VolumeCommand::Restore {
            data,
            name,
            id,
            rename,
        } => (
            data,
            R::Restore {
                name: name.clone(),
                id,
                rename: rename.clone(),
            },
            format!("volume {} restored", rename.as_deref().unwrap_or(&name)),
        ),
        VolumeCommand::ForgetMounts { data, node } => (
            data,
            R::ForgetMounts(node),
            format!("forgot every volume mount recorded for node {node}"),
        ),
        VolumeCommand::Purge { data, name, id } => (
            data,
            R::Purge {
                name: name.clone(),
                id,
            },
            format!("removed volume {name} deleted for good"),
        ),
        VolumeCommand::Retention { data, duration } => {
            let set = duration.map(|d| d.as_secs());
            match runtime()?.block_on(admin::request(
                &data,
                AdminRequest::Volume(R::Retention(set)),
            ))? {
                AdminReply::Retention(secs) => {
                    let d = humantime::format_duration(std::time::Duration::from_secs(secs));
                    println!("removed volumes stay in the trash for {d}");
                    return Ok(());
                }
                other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
            }
        }
        VolumeCommand::Ls { data, json } => {
            let vs = volumes(&data, R::List)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vs)?);
                return Ok(());
            }
            let mut t = table(
                &[
                    "NAME",
                    "STATE",
                    "ID",
                    "REMOVED",
                    "USED",
                    "QUOTA",
                    "ENTRIES",
                    "REPLICAS",
                    "MOUNTED ON",
                ],
                &[2, 4, 5, 6, 7],
            );
            for v in vs {
                let mounted: Vec<String> = v
                    .mounts
                    .iter()
                    .map(|m| format!("{} ({}×)", m.name, m.count))
                    .collect();
                let removed = v.trashed.map_or("-".into(), |t| {
                    let at =
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
                    humantime::format_rfc3339_seconds(at).to_string()
                });
                t.add_row([
                    v.name,
                    v.state,
                    v.id.to_string(),
                    removed,
                    bytesize::ByteSize(v.used).to_string(),
                    v.quota
                        .map_or("-".into(), |q| bytesize::ByteSize(q).to_string()),
                    v.entries.to_string(),
                    v.replicas.to_string(),
                    if mounted.is_empty() {
                        "-".into()
                    } else {
                        mounted.join(", ")
                    },
                ]);
            }
            println!("{}", t.trim_fmt());
            return Ok(());
        }
        VolumeCommand::Inspect { data, name } => {
            let vs = volumes(&data, R::Inspect(name))?;
            println!("{}", serde_json::to_string_pretty(&vs[0])?);
            return Ok(());
        }
    };
    match runtime()?.block_on(admin::request(&data, AdminRequest::Volume(req)))? {
        AdminReply::Done => {
            println!("{done}");
            Ok(())
        }
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
}

fn volumes(
    data: &std::path::Path,
    req: admin::VolumeRequest,
) -> anyhow::Result<Vec<admin::VolumeInfo>> {
    match runtime()?.block_on(admin::request(data, AdminRequest::Volume(req)))? {
        AdminReply::Volumes(vs) => Ok(vs),
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
}

#[derive(Subcommand)]
enum LabelCommand {
    /// Set labels: `shoal node label add 2 storage=ssd zone=a`
    Add {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The node's id (see `shoal node ls`)
        id: u64,
        /// KEY=VALUE pairs
        #[arg(required = true, value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Remove labels by key: `shoal node label rm 2 zone`
    Rm {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// The node's id (see `shoal node ls`)
        id: u64,
        /// Label keys
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (e.g. storage=ssd)"))?;
    shoal_raft::check_label(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("shoal")
        .build()
        .context("starting the async runtime")
}

fn check_block_size(size: ByteSize) -> anyhow::Result<u32> {
    let n = size.as_u64();
    if !(64 << 10..=64 << 20).contains(&n) {
        anyhow::bail!(
            "--block-size {size} is out of range: use a size from 64KiB to 64MiB (default 4MiB)"
        );
    }
    Ok(n as u32)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            data,
            block_size,
            listen,
            tunables,
        } => {
            let block_size = check_block_size(block_size)?;
            init_tracing("warn");
            let config = runtime()?.block_on(node::init(
                &data,
                block_size,
                listen,
                tunables.cert_validity(),
            ))?;
            println!(
                "initialized cluster {} with node {} in {}\nstart it with: shoal daemon --data {} --mount /mnt/shoal",
                config.cluster_id,
                config.node_id,
                data.display(),
                data.display()
            );
            if let Some(listen) = listen {
                println!(
                    "other nodes join with: shoal join --token {} --peer {listen} --listen ADDR:PORT",
                    token_of(&data)?
                );
            }
            Ok(())
        }
        Command::Join {
            data,
            token,
            peer,
            listen,
            client,
        } => {
            init_tracing("warn");
            let token: JoinToken = token.parse()?;
            let config = runtime()?.block_on(shoal_fs::node::join::join(
                &data, token, peer, listen, client,
            ))?;
            println!(
                "joined cluster {} as {}node {}\nstart it with: shoal daemon --data {} --mount /mnt/shoal",
                config.cluster_id,
                if client { "client " } else { "" },
                config.node_id,
                data.display()
            );
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Show { data },
        } => {
            println!("{}", token_of(&data)?);
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Rotate { data },
        } => match runtime()?.block_on(admin::request(&data, AdminRequest::RotateToken))? {
            AdminReply::Token(t) => {
                println!("{t}");
                Ok(())
            }
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        },
        Command::Ca {
            command: CaCommand::Rotate { data },
        } => match runtime()?.block_on(admin::request(&data, AdminRequest::RotateCa))? {
            AdminReply::Token(t) => {
                eprintln!(
                    "rotated the cluster CA; nodes move to it within seconds. The new join token:"
                );
                println!("{t}");
                eprintln!(
                    "when `shoal node ls` shows every node up, run `shoal ca retire` to stop accepting the old CA"
                );
                Ok(())
            }
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        },
        Command::Ca {
            command: CaCommand::Retire { data },
        } => match runtime()?.block_on(admin::request(&data, AdminRequest::RetireCa))? {
            AdminReply::Done => {
                println!("retired the old CA: only certificates from the current one are accepted");
                Ok(())
            }
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        },
        Command::Node {
            command: NodeCommand::Rm { data, id, no_wait },
        } => match runtime()?.block_on(admin::request(&data, AdminRequest::RemoveNode(id)))? {
            AdminReply::Done => {
                println!("node {id} removed");
                if no_wait {
                    return Ok(());
                }
                wait_for_repair(&data)
            }
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        },
        Command::Node {
            command: NodeCommand::Ls { data, json },
        } => {
            let reply = runtime()?.block_on(admin::request(&data, AdminRequest::Members))?;
            let AdminReply::Members(members) = reply else {
                anyhow::bail!("unexpected reply from the daemon: {reply:?}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&members)?);
                return Ok(());
            }
            print_members(&members);
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Label { command },
        } => {
            let (data, id, changes): (PathBuf, u64, Vec<(String, Option<String>)>) = match command {
                LabelCommand::Add { data, id, labels } => (
                    data,
                    id,
                    labels.into_iter().map(|(k, v)| (k, Some(v))).collect(),
                ),
                LabelCommand::Rm { data, id, keys } => {
                    (data, id, keys.into_iter().map(|k| (k, None)).collect())
                }
            };
            let rt = runtime()?;
            for (key, value) in changes {
                let req = AdminRequest::Label {
                    node: id,
                    key: key.clone(),
                    value: value.clone(),
                };
                match rt.block_on(admin::request(&data, req))? {
                    AdminReply::Done => match value {
                        Some(v) => println!("node {id}: {key}={v}"),
                        None => println!("node {id}: {key} removed"),
                    },
                    other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
                }
            }
            Ok(())
        }
        Command::Daemon {
            data,
            mount,
            cache_size,
            fuse_threads,
            log,
            plugin_socket,
            no_plugin,
            allow_suid_dev,
            gc_grace,
            metrics,
            tunables,
        } => {
            init_tracing(&log);
            if !(1..=64).contains(&fuse_threads) {
                anyhow::bail!("--fuse-threads {fuse_threads} is out of range: use 1 to 64");
            }
            let options = NodeOptions {
                cache_bytes: cache_size.as_u64(),
                gc_grace,
                snapshot_every: tunables.snapshot_every,
                cert_validity: tunables.cert_validity(),
                ..NodeOptions::default()
            };
            runtime()?.block_on(daemon::run(daemon::DaemonArgs {
                data: &data,
                mount: &mount,
                options,
                fuse_threads,
                allow_suid_dev,
                plugin_socket: (!no_plugin).then_some(plugin_socket.as_path()),
                metrics,
            }))
        }
        Command::Volume { command } => volume_command(command),
        Command::Fsck { data, repair } => fsck(&data, repair),
        Command::Status {
            data,
            watch: Some(every),
            ..
        } => watch_status(&data, every),
        Command::Status { data, json, .. } => {
            let reply = runtime()?.block_on(admin::request(&data, AdminRequest::Status))?;
            let AdminReply::Status(s) = reply else {
                anyhow::bail!("unexpected reply from the daemon: {reply:?}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(())
        }
        Command::Local { command } => local::run(command),
        Command::Mount(args) => helper::mount(args, |line| {
            Cli::try_parse_from(std::iter::once("shoal".to_string()).chain(line.iter().cloned()))
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim_end()))
        }),
        Command::Debug {
            command: DebugCommand::Docs { out },
        } => write_docs(&out),
        Command::Debug {
            command:
                DebugCommand::Failpoint {
                    data,
                    name,
                    actions,
                },
        } => {
            let req = AdminRequest::Failpoint { name, actions };
            match runtime()?.block_on(admin::request(&data, req))? {
                AdminReply::Done => Ok(()),
                other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
            }
        }
    }
}

/// `shoal fsck`'s line on blocks no file names (not an error: space, not data).
fn print_unreferenced(
    answers: &[(u64, Result<shoal_fs::blocks::gc::Unreferenced, String>)],
    deleted: bool,
) {
    let total: u64 = answers
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok())
        .map(|u| u.blocks)
        .sum();
    let each: Vec<String> = answers
        .iter()
        .map(|(n, a)| match a {
            Ok(u) if u.blocks == 0 => format!("node {n}: 0"),
            Ok(u) => format!("node {n}: {} ({})", u.blocks, ByteSize(u.bytes)),
            Err(e) => format!("node {n}: unknown ({e})"),
        })
        .collect();
    let verb = if deleted { "deleted" } else { "found" };
    let recent: u64 = answers
        .iter()
        .filter_map(|(_, a)| a.as_ref().ok())
        .map(|u| u.recent)
        .sum();
    println!(
        "{total} unreferenced blocks {verb} (on disk, named by no file, older than a minute): {}",
        each.join(", ")
    );
    if recent > 0 {
        println!(
            "  and {recent} younger than a minute, left alone: a commit may be about to name them"
        );
    }
    if total > 0 && !deleted {
        println!(
            "  left by a crash between storing a block and committing it; each node's sweep deletes them within an hour, `shoal fsck --repair` now"
        );
    }
}

fn token_of(data: &std::path::Path) -> anyhow::Result<String> {
    let path = shoal_fs::cluster::token_path(data);
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: only the node that ran `shoal init --listen` has the join token",
            path.display()
        )
    })?;
    Ok(token.trim().to_string())
}

fn print_status(s: &admin::Status) {
    print_status_lines(s);
    println!(
        "replicas      {} blocks this node should hold are missing here, {} repaired since start",
        s.under_replicated, s.repaired
    );
    println!(
        "garbage       {} blocks no file references, until every member deleted its copies",
        s.garbage_blocks
    );
    if s.lost > 0 {
        println!(
            "LOST          {} block reads since start found no good copy on any node (each failed with EIO): see the log for the blocks, and restore the files from a backup",
            s.lost
        );
    }
}

fn parse_watch(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a refresh interval: give seconds from 0.1 to 3600, e.g. --watch 2"
        )),
    }
}

/// `shoal status --watch`: the node's status, the rates of what it does, and the members,
/// redrawn every `every` seconds until interrupted.
fn watch_status(data: &std::path::Path, every: f64) -> anyhow::Result<()> {
    let rt = runtime()?;
    let every = std::time::Duration::from_secs_f64(every);
    let mut last: Option<(std::time::Instant, admin::Status)> = None;
    loop {
        let reply = rt.block_on(admin::request(data, AdminRequest::Status))?;
        let AdminReply::Status(s) = reply else {
            anyhow::bail!("unexpected reply from the daemon: {reply:?}");
        };
        let members = match rt.block_on(admin::request(data, AdminRequest::Members))? {
            AdminReply::Members(m) => m,
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        };
        let now = std::time::Instant::now();
        // Clear the screen and go home, then draw.
        print!("\x1b[2J\x1b[H");
        print_status(&s);
        if let Some((then, before)) = &last {
            let secs = now.duration_since(*then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            let (t, b) = (&s.totals, &before.totals);
            println!(
                "rates         {:.0} FUSE req/s ({:.0} reads, {:.0} writes, {:.0} fsyncs), {:.0} commits/s",
                rate(t.fuse_ops, b.fuse_ops),
                rate(t.reads, b.reads),
                rate(t.writes, b.writes),
                rate(t.fsyncs, b.fsyncs),
                rate(t.commits, b.commits),
            );
            let hits = s.cache_hits.saturating_sub(before.cache_hits);
            let misses = s.cache_misses.saturating_sub(before.cache_misses);
            println!(
                "replication   {}/s in, {}/s out; cache {}",
                ByteSize(rate(t.replicated_in, b.replicated_in) as u64),
                ByteSize(rate(t.replicated_out, b.replicated_out) as u64),
                if hits + misses == 0 {
                    "idle".to_string()
                } else {
                    format!("{:.0}% hits", hits as f64 * 100.0 / (hits + misses) as f64)
                }
            );
        } else {
            println!("rates         (from the next refresh)");
        }
        println!();
        print_members(&members);
        println!();
        println!("refreshing every {every:?}; Ctrl-C to stop");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        last = Some((now, *s));
        std::thread::sleep(every);
    }
}

/// `shoal debug docs`: man pages and shell completions, from the clap definitions.
fn write_docs(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "shoal", &completions)
            .with_context(|| {
                format!("writing {shell} completions into {}", completions.display())
            })?;
    }
    Ok(())
}

/// `shoal node ls`'s table.
fn print_members(members: &[admin::Member]) {
    let mut t = table(
        &[
            "ID",
            "HOST",
            "ADDRESS",
            "ROLE",
            "STATE",
            "DISK USED",
            "LABELS",
        ],
        &[],
    );
    for m in members {
        let disk = m.disk.as_ref().map_or_else(
            || "not reported yet".to_string(),
            |d| {
                let used = d.total.saturating_sub(d.free);
                format!(
                    "{} / {} ({}%)",
                    bytesize::ByteSize(used),
                    bytesize::ByteSize(d.total),
                    used * 100 / d.total.max(1)
                )
            },
        );
        let labels: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row([
            m.id.to_string(),
            if m.hostname.is_empty() {
                "-".into()
            } else {
                m.hostname.clone()
            },
            m.addr.clone(),
            m.role.clone(),
            if m.up { "up" } else { "down" }.into(),
            disk,
            labels.join(","),
        ]);
    }
    println!("{}", t.trim_fmt());
}

/// A leader whose quorum has not answered for this long (several election timeouts) is cut off.
const QUORUM_LOST_MS: u64 = 2_000;

fn print_status_lines(s: &admin::Status) {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "node          {} (cluster {}, shoal {})",
        s.node_id, s.cluster_id, s.version
    );
    println!(
        "raft          {} term {}, leader {}, log {}, applied {}",
        s.raft_state,
        s.term,
        opt(s.leader),
        opt(s.last_log_index),
        opt(s.last_applied)
    );
    match s.quorum_ack_ms {
        Some(ms) if ms >= QUORUM_LOST_MS => println!(
            "quorum        LOST: no majority has answered this leader for {:.1} s; it cannot commit, and the others may have elected another (check the network to them)",
            ms as f64 / 1000.0
        ),
        Some(ms) => println!("quorum        acknowledged {ms} ms ago"),
        None => {}
    }
    if s.headroom_spent {
        println!(
            "disk          FULL: the metadata is using the space kept for it and file data is refused; free space on the data disk"
        );
    }
    println!("mount         {}", s.mount.as_deref().unwrap_or("-"));
    println!("uptime        {}s", s.uptime_secs);
    println!("inodes        {}", s.inodes);
    println!(
        "blocks        {} ({} on disk, {} free); {} of small writes in the Raft log, not yet in blocks",
        s.blocks,
        ByteSize(s.block_bytes),
        ByteSize(s.disk_free_bytes),
        ByteSize(s.inline_bytes)
    );
    println!(
        "memory        {} cached blocks, {} buffered writes in {} open files",
        ByteSize(s.cache_bytes),
        ByteSize(s.dirty_bytes),
        s.open_files
    );
}

fn main() -> ExitCode {
    // mount(8) runs /sbin/mount.fuse.shoal (a link to shoal) as `mount.fuse.shoal DATA
    // MOUNTPOINT -o OPTIONS`: that is `shoal mount`.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if matches!(called.as_str(), "mount.fuse.shoal" | "mount.shoal") {
        argv.splice(0..1, ["shoal".into(), "mount".into()]);
    }
    let cli = Cli::parse_from(argv);
    if !matches!(cli.command, Command::Daemon { .. } | Command::Mount(_)) {
        // A command's output piped into `head` ends quietly when the pipe closes, as other
        // tools do, where Rust's ignored SIGPIPE made `println!` panic. The daemon keeps it
        // ignored: a peer closing a socket must cost it a write error, not its life.
        // SAFETY: no other thread runs yet, and the default action needs no handler. The one
        // `unsafe` of the workspace: std offers no way to restore a signal's default action.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks checked per request to the daemon.
const FSCK_BATCH: u32 = 64;

/// Waits, with a progress bar, until every member that answers holds every block copy it
/// should: a full repair round ran on each after the first look, and none lacks a copy.
fn wait_for_repair(data: &std::path::Path) -> anyhow::Result<()> {
    use shoal_fs::cluster::rpc::RepairState;
    let rt = runtime()?;
    let ask = || -> anyhow::Result<Vec<(u64, Result<RepairState, String>)>> {
        match rt.block_on(admin::request(data, AdminRequest::Repair))? {
            AdminReply::Repair(states) => Ok(states),
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        }
    };
    // Rounds each member had finished at the first look: one that starts after it sees the
    // new membership.
    let first: std::collections::BTreeMap<u64, u64> = ask()?
        .into_iter()
        .filter_map(|(n, s)| Some((n, s.ok()?.rounds)))
        .collect();
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "{spinner} copying the blocks it held onto the others {bar:40} {pos}/{len} {msg}",
    )?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut most = 0u64;
    loop {
        let states = ask()?;
        let mut left = 0;
        let mut settled = true;
        let mut silent = Vec::new();
        let mut lacking = Vec::new();
        for (n, state) in &states {
            match state {
                Ok(s) => {
                    left += s.missing;
                    if s.missing > 0 {
                        lacking.push(format!("node {n}: {}", s.missing));
                    }
                    settled &= s.rounds >= first.get(n).copied().unwrap_or(0) + 2;
                }
                Err(e) => silent.push(format!("node {n}: {e}")),
            }
        }
        most = most.max(left);
        bar.set_length(most);
        bar.set_position(most - left);
        // Who still lacks copies (a node out of space keeps lacking them: see its log), who
        // did not answer, and that stopping the wait stops nothing else.
        let mut notes = Vec::new();
        if !lacking.is_empty() {
            notes.push(format!("lacking: {}", lacking.join(", ")));
        }
        if !silent.is_empty() {
            notes.push(format!("not answering: {}", silent.join("; ")));
        }
        notes.push("Ctrl-C stops waiting, not the copying".into());
        bar.set_message(format!("({})", notes.join("; ")));
        if settled && left == 0 {
            bar.finish_and_clear();
            println!("every block has its copies on the remaining nodes");
            if !silent.is_empty() {
                println!(
                    "not counted, as they did not answer (they copy what they lack when back): {}",
                    silent.join("; ")
                );
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `shoal fsck`: walks every referenced block through the daemon in batches, with a progress
/// bar, lists what is wrong, and with `repair` fixes what can be fixed and checks it again.
fn fsck(data: &std::path::Path, repair: bool) -> anyhow::Result<()> {
    use shoal_fs::node::fsck::{BlockCheck, FsckBatch};
    let rt = runtime()?;
    let ask = |req: AdminRequest| -> anyhow::Result<FsckBatch> {
        match rt.block_on(admin::request(data, req))? {
            AdminReply::Fsck(b) => Ok(b),
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        }
    };
    let mut after = None;
    let mut problems: Vec<BlockCheck> = Vec::new();
    let mut unreachable = std::collections::BTreeSet::new();
    let mut checked = 0u64;
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "{spinner} checking blocks {bar:40} {pos}/{len} ({eta} left)",
    )?);
    loop {
        let batch = ask(AdminRequest::Fsck {
            after,
            limit: FSCK_BATCH,
            only: Vec::new(),
        })?;
        bar.set_length(batch.total);
        bar.inc(batch.checked.len() as u64);
        checked += batch.checked.len() as u64;
        unreachable.extend(batch.unreachable);
        problems.extend(batch.checked.into_iter().filter(|b| !b.healthy()));
        match batch.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    bar.finish_and_clear();
    let describe = |b: &BlockCheck| -> String {
        let nodes = |v: &[u64]| {
            v.iter()
                .map(|n| format!("node {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if b.lost() {
            format!("block {}: LOST: no node has a good copy", b.id)
        } else {
            format!(
                "block {}: missing or damaged on {} (good on {})",
                b.id,
                nodes(&b.lacking()),
                nodes(&b.good)
            )
        }
    };
    if !unreachable.is_empty() {
        println!(
            "nodes that did not answer (their copies count as missing): {}",
            unreachable
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "{checked} referenced blocks checked: {} with every copy in place, {} short of copies, {} lost",
        checked - problems.len() as u64,
        problems.iter().filter(|b| !b.lost()).count(),
        problems.iter().filter(|b| b.lost()).count()
    );
    for b in problems.iter().take(20) {
        println!("  {}", describe(b));
    }
    let req = AdminRequest::Unreferenced { delete: repair };
    match rt.block_on(admin::request(data, req))? {
        AdminReply::Unreferenced(answers) => print_unreferenced(&answers, repair),
        other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
    }
    if problems.len() > 20 {
        println!("  … and {} more", problems.len() - 20);
    }
    if problems.is_empty() {
        return Ok(());
    }
    if !repair {
        anyhow::bail!(
            "the cluster is short of copies: run `shoal fsck --repair` (repair also runs by itself every few seconds for nodes that lack a block)"
        );
    }
    let ids: Vec<_> = problems
        .iter()
        .filter(|b| !b.lost())
        .map(|b| b.id)
        .collect();
    let bar = indicatif::ProgressBar::new(ids.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{spinner} repairing {bar:40} {pos}/{len}")?,
    );
    let mut made = 0;
    for chunk in ids.chunks(FSCK_BATCH as usize) {
        match rt.block_on(admin::request(
            data,
            AdminRequest::FsckRepair(chunk.to_vec()),
        ))? {
            AdminReply::Repaired(n) => made += n,
            other => anyhow::bail!("unexpected reply from the daemon: {other:?}"),
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mut left = Vec::new();
    for chunk in problems.chunks(FSCK_BATCH as usize) {
        let batch = ask(AdminRequest::Fsck {
            after: None,
            limit: 0,
            only: chunk.iter().map(|b| b.id).collect(),
        })?;
        left.extend(batch.checked.into_iter().filter(|b| !b.healthy()));
    }
    println!(
        "repaired: {made} copies made; {} of {} blocks still short or lost",
        left.len(),
        problems.len()
    );
    for b in left.iter().take(20) {
        println!("  {}", describe(b));
    }
    if left.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "some blocks could not be repaired (a lost block's bytes are gone: restore its files from a backup)"
        )
    }
}

/// A table as the CLI prints it: no borders, columns two spaces apart, the columns `right`
/// right-aligned; each line starts with the first column, so `awk` and `grep '^NAME'` work.
fn table(header: &[&str], right: &[usize]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_start_each_line_with_the_first_column_and_align_numbers_right() {
        let mut t = table(&["NAME", "STATE", "ID"], &[2]);
        t.add_row(["data", "active", "7"]);
        t.add_row(["logs-2", "trash", "1234"]);
        let text = t.trim_fmt();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "NAME    STATE     ID",
                "data    active     7",
                "logs-2  trash   1234",
            ],
            "{text}"
        );
    }
}
