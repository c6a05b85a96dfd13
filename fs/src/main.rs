//! The `shoal` command.

mod local;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use shoal_fs::admin::{self, AdminReply, AdminRequest};
use shoal_fs::{NodeOptions, daemon, node};

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
    },
    /// Run the node in the foreground and mount its filesystem
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
    },
    /// Show the running node's state: Raft, mount, usage
    Status {
        #[arg(long, default_value = "/var/lib/shoal")]
        data: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Run a local cluster for trying shoal out
    Local {
        #[command(subcommand)]
        command: local::LocalCommand,
    },
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
        Command::Init { data, block_size } => {
            let block_size = check_block_size(block_size)?;
            init_tracing("warn");
            let config = runtime()?.block_on(node::init(&data, block_size))?;
            println!(
                "initialized cluster {} with node {} in {}\nstart it with: shoal daemon --data {} --mount /mnt/shoal",
                config.cluster_id,
                config.node_id,
                data.display(),
                data.display()
            );
            Ok(())
        }
        Command::Daemon {
            data,
            mount,
            cache_size,
            fuse_threads,
            log,
        } => {
            init_tracing(&log);
            if !(1..=64).contains(&fuse_threads) {
                anyhow::bail!("--fuse-threads {fuse_threads} is out of range: use 1 to 64");
            }
            let options = NodeOptions {
                cache_bytes: cache_size.as_u64(),
                ..NodeOptions::default()
            };
            runtime()?.block_on(daemon::run(daemon::DaemonArgs {
                data: &data,
                mount: &mount,
                options,
                fuse_threads,
            }))
        }
        Command::Status { data, json } => {
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
    }
}

fn print_status(s: &admin::Status) {
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
    println!("mount         {}", s.mount.as_deref().unwrap_or("-"));
    println!("uptime        {}s", s.uptime_secs);
    println!("inodes        {}", s.inodes);
    println!(
        "blocks        {} ({} on disk, {} free)",
        s.blocks,
        ByteSize(s.block_bytes),
        ByteSize(s.disk_free_bytes)
    );
    println!(
        "memory        {} cached blocks, {} buffered writes in {} open files",
        ByteSize(s.cache_bytes),
        ByteSize(s.dirty_bytes),
        s.open_files
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
