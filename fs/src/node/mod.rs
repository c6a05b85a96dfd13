//! The node: one shoal daemon's state. It owns the Raft instance, the metadata view, the block
//! store and cache, and the open files' write buffers. POSIX operations on it live in `ops`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::Retryable;
use openraft::{BasicNode, ServerState};
use serde::{Deserialize, Serialize};
use shoal_raft::{BlockId, FsError, Ino, Kv, MetaCommand, MetaRequest, Raft, Reply, StateView};
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, error, info, warn};

use crate::blocks::{BlockCache, BlockError, BlockStore};
use crate::cluster::rpc::Refusal;
use file::OpenFile;
use raft_net::NoPeers;

pub(crate) mod compact;
pub mod election;
pub(crate) mod file;
pub mod fsck;
pub mod gc;
pub mod join;
pub mod members;
mod membership;
mod raft_net;
pub mod repair;
pub mod replicate;
mod serve;
pub mod spill;
pub mod trust;

pub use membership::ensure_member;
pub use serve::VOTERS;
pub use trust::CaError;

/// How long a request waits for a leader to answer (an election takes one to two seconds).
const FORWARD_PATIENCE: Duration = Duration::from_secs(10);
/// How long a proposal may wait for Raft before the caller gets an error (EIO): far beyond
/// an election, short enough that no FUSE request hangs for good.
const PROPOSE_PATIENCE: Duration = Duration::from_secs(30);

/// A read of the metadata store that failed: logged, and an EIO for the caller.
pub(crate) fn store_err(e: shoal_raft::StoreError) -> OpError {
    error!(error = %e, "metadata store read failed");
    OpError::Store(e)
}

/// How a node waits between attempts while the cluster settles (an election, a quorum coming
/// back): `delay` plus up to as much again at random, so that the nodes asking do not ask in
/// step. The caller's `when` decides when to stop.
pub(crate) fn settle(delay: Duration) -> backon::ConstantBuilder {
    backon::ConstantBuilder::new()
        .with_delay(delay)
        .with_jitter()
        .without_max_times()
}

/// Disk space kept free for metadata: data writes fail with ENOSPC before the disk is full.
pub const SPACE_RESERVE: u64 = 128 << 20;

/// At most one "disk is full" line per this long.
const SPACE_WARN_EVERY: Duration = Duration::from_secs(10);

/// The file in the data directory that says which cluster and node it belongs to.
pub const CONFIG_FILE: &str = "shoal.json";

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: u64,
    pub cluster_id: String,
    /// The largest block a file's data is cut into.
    pub block_size: u32,
    /// Where this node listens for other nodes (QUIC); none for a node that never joins others.
    #[serde(default)]
    pub listen: Option<String>,
    /// Members this node joined through, asked to add it when it first starts.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A client node (`shoal join --client`): it mounts, reads and writes, but stores no
    /// blocks and never votes.
    #[serde(default)]
    pub client: bool,
}

impl ClusterConfig {
    pub fn load(data: &Path) -> Result<ClusterConfig, NodeError> {
        let path = data.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NodeError::NotInitialized(data.to_path_buf()));
            }
            Err(e) => return Err(NodeError::Io(path, e)),
        };
        serde_json::from_str(&text).map_err(|e| NodeError::BadConfig(path, e.to_string()))
    }

    pub fn save(&self, data: &Path) -> Result<(), NodeError> {
        let path = data.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(self).expect("config serializes");
        shoal_net::durable::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|e| NodeError::Io(path, e))
    }
}

/// Tunables of a running node that are not part of the cluster's identity.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Bytes of verified blocks kept in memory.
    pub cache_bytes: u64,
    /// A file's buffered writes are committed in the background once they reach this size.
    pub commit_bytes: usize,
    /// Buffered writes are committed at least this often.
    pub commit_interval: Duration,
    /// Unreferenced blocks younger than this are left alone by the garbage collector.
    pub gc_grace: Duration,
    /// Raft log entries between two snapshots of the state machine.
    pub snapshot_every: u64,
    /// How long the certificates this node signs (holding the CA) are valid; every node renews
    /// its own at half of it.
    pub cert_validity: Duration,
    /// Talk to the other nodes over this in-memory network instead of QUIC (the deterministic
    /// tests' `testkit`); `None` in the daemon.
    pub network: Option<Arc<shoal_net::memory::MemoryNetwork>>,
    /// Take the session of the daemon whose FUSE connection this one serves on, instead of
    /// opening a new one: the locks and unlinked-but-open files of the processes using the
    /// mount stay theirs.
    pub resume: Option<Resume>,
}

/// What a daemon that takes over a FUSE connection carries over from the one before it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// The previous daemon's session.
    pub session: u64,
    /// Its session epoch: handles opened in it stay valid.
    pub epoch: u64,
    /// Its open files and their kernel handles, when it handed them over; `None` after a
    /// crash, when they are learned as the kernel uses them (and unlinked files the session
    /// held are kept to its end, since a handle on them may be open).
    pub open: Option<Vec<(Ino, usize)>>,
}

/// Where a node records its session and epoch (`Node::record_session`).
const SESSION_FILE: &str = "session";

/// The session and epoch the last daemon in `data` recorded.
pub fn recorded_session(data: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(data.join(SESSION_FILE)).ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Opens held for an unlinked file after a crash, when how many handles the kernel has on it
/// is unknown: it is kept until the session ends.
const OPENS_UNKNOWN: usize = usize::MAX / 4;

/// The first proposal number of a daemon run: microseconds since the epoch, so that it is
/// above every number a previous run of the same session used (that would have taken more
/// than one proposal per microsecond), and the state machine never takes a new proposal for
/// an old one's copy.
fn first_seq() -> u64 {
    (now_nanos() / 1_000).max(1) as u64
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            cache_bytes: 256 << 20,
            commit_bytes: 32 << 20,
            commit_interval: Duration::from_secs(1),
            gc_grace: Duration::from_secs(60),
            snapshot_every: 20_000,
            cert_validity: crate::cluster::CERT_VALIDITY,
            network: None,
            resume: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0} is not a shoal data directory: run `shoal init --data {d}` first", d = .0.display())]
    NotInitialized(PathBuf),
    #[error(
        "{0} is already initialized for cluster {1}: use another --data directory, or delete it to start over"
    )]
    AlreadyInitialized(PathBuf, String),
    #[error("cannot parse {0}: {1}")]
    BadConfig(PathBuf, String),
    #[error("another shoal daemon is using {0}: stop it first (see `shoal status --data {d}`)", d = .0.display())]
    Locked(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("refusing to run on an unsafe data directory: {0}")]
    Unsafe(#[from] crate::private::UnsafeDir),
    #[error("metadata store: {0}")]
    Store(#[from] shoal_raft::StoreError),
    #[error("block store: {0}")]
    Blocks(#[from] BlockError),
    #[error("raft: {0}")]
    Raft(String),
    /// The node's certificates and keys (`DATA/tls`) or its QUIC endpoint: made, loaded, saved
    /// or set up.
    #[error(transparent)]
    Tls(#[from] crate::cluster::TlsError),
    #[error("joining the cluster failed: {0}")]
    Join(String),
}

/// The failure of one filesystem operation.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Fs(#[from] FsError),
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("metadata proposal failed: {0}")]
    Raft(String),
    /// A commit could not put its blocks on as many nodes as an fsync promises.
    #[error("{0}")]
    Replication(String),
    /// The data disk is down to the space kept for metadata (`Node::check_space`).
    #[error("the data disk is full")]
    NoSpace,
    /// I/O through a handle of a file this node does not have open.
    #[error("the file is not open on this node")]
    NotOpen,
    /// A lock wait ended because the daemon is handing its mount to its successor (which
    /// takes it up; EINTR only where the kernel cannot resend it).
    #[error("interrupted: the daemon is handing its mount over")]
    Interrupted,
    /// `SEEK_DATA` or `SEEK_HOLE` from past the end, or no data after the offset.
    #[error("no data past the offset")]
    PastEnd,
    /// This node's session was fenced: handles opened before are dead, and files only that
    /// session kept are gone.
    #[error("this node's session expired; reopen the file")]
    Fenced,
    /// Buffered writes dropped before a lock over the file was released (they would otherwise
    /// land outside it).
    #[error(
        "buffered writes were dropped: their commit failed before a lock over the file was released"
    )]
    Unlanded,
    /// The metadata store could not be read.
    #[error("metadata store: {0}")]
    Store(shoal_raft::StoreError),
    /// The data disk could not be asked for its free space.
    #[error("data disk: {0}")]
    Disk(std::io::Error),
    /// A buffered write of the file could not land; reported once, at the next fsync or close.
    #[error("an earlier write of this file failed: {0}")]
    Earlier(Arc<OpError>),
}

impl OpError {
    /// Out of space, whether the node refused or the disk did.
    pub fn is_no_space(&self) -> bool {
        match self {
            OpError::NoSpace => true,
            OpError::Block(BlockError::Io { source, .. }) | OpError::Disk(source) => {
                source.kind() == std::io::ErrorKind::StorageFull
            }
            OpError::Earlier(e) => e.is_no_space(),
            _ => false,
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;

pub fn now_nanos() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

pub struct Node {
    pub id: u64,
    pub config: ClusterConfig,
    pub options: NodeOptions,
    pub data_dir: PathBuf,
    pub raft: Raft,
    pub view: StateView,
    pub blocks: Arc<BlockStore>,
    pub cache: Arc<BlockCache>,
    /// This daemon run's session: owns its locks and the orphans it keeps open.
    session: Arc<AtomicU64>,
    /// Bumped when this node's session expired and a new one was opened: files opened before
    /// are fenced (their writes fail), because locks taken through them are gone.
    pub(crate) epoch: AtomicU64,
    pub started: Instant,
    /// The runtime the node's tasks run on; FUSE threads spawn onto it.
    pub rt: tokio::runtime::Handle,
    pub(crate) files: Mutex<HashMap<Ino, Arc<OpenFile>>>,
    /// Blocks written but not yet referenced by a committed layout; the collector skips them.
    pub(crate) unreferenced_writes: Mutex<HashMap<BlockId, u32>>,
    /// Woken when a write was refused for lack of space: the collector runs at once.
    pub(crate) space_short: Arc<Notify>,
    /// When the last "disk is full" warning was logged (ns), and refusals since then.
    space_warned: (std::sync::atomic::AtomicI64, AtomicU64),
    pub(crate) dirty_bytes: AtomicU64,
    /// Blocks this node should hold and lacks, as of the last repair round.
    pub(crate) repair_missing: AtomicU64,
    /// Repair rounds finished since the node started.
    pub(crate) repair_rounds: AtomicU64,
    /// Blocks this node has fetched to restore their replica count, or to replace a damaged
    /// copy a read found.
    pub(crate) repair_fetched: AtomicU64,
    /// Reads that found a block on no node (missing or damaged everywhere): each was an EIO.
    pub(crate) blocks_lost: AtomicU64,
    /// Each file's (mtime, size) when this node last opened it, to tell whether the kernel's
    /// cached pages are still good.
    pub(crate) seen: Mutex<HashMap<Ino, (shoal_raft::Nanos, u64)>>,
    pub(crate) purge_tx: mpsc::UnboundedSender<Ino>,
    /// Unlinked inodes this node is letting go of (`Purge` proposed, not yet applied): no new
    /// handle may open them, since the release may be the last one and delete them.
    pub(crate) releasing: Mutex<std::collections::HashSet<Ino>>,
    /// Numbers this node's proposals (`MetaRequest::seq`), so a retried one applies once.
    next_seq: AtomicU64,
    /// The numbers of the proposals still waiting for their answer.
    in_flight: Mutex<std::collections::BTreeSet<u64>>,
    /// Woken whenever this node releases a lock, so blocked lock requests retry.
    pub(crate) locks_changed: Arc<Notify>,
    /// Set while handing the mount to a successor: lock waits end (`OpError::Interrupted`),
    /// and the FUSE adapter leaves them to the successor.
    pub(crate) handing_over: std::sync::atomic::AtomicBool,
    /// This run took over a FUSE connection: a handle the kernel uses on a file not open here
    /// was opened by the previous daemon, and is adopted.
    pub(crate) adopt_unknown: bool,
    /// The kernel notifier of this node's mount, once mounted: see `invalidate`.
    pub(crate) notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// The thread that drops other nodes' changes from the kernel's caches.
    pub(crate) invalidator: Arc<crate::invalidate::Invalidator>,
    /// Space kept on the data disk for metadata, given back when the disk fills up: while it
    /// is, file data is refused (see `shoal_raft::headroom`).
    pub(crate) headroom: Arc<shoal_raft::headroom::Headroom>,
    /// The Raft log's growth since the last snapshot, which `compact` watches.
    pub(crate) log_size: Arc<shoal_raft::LogSize>,
    /// The snapshots this node is sending, whose log `compact` keeps.
    pub(crate) snapshot_sends: Arc<crate::cluster::network::SnapshotSends>,
    /// What the node counts as it works, for `/metrics` (`crate::metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The cluster network, for a node started with a listen address.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The root span of everything this node does (`node` = its id): its workers, the tasks
    /// of its FUSE requests and of the requests it serves run in it, so the log of several
    /// nodes in one process (the simulation) tells them apart.
    span: tracing::Span,
    /// Held for the whole life of the node: the data directory's lock file.
    _lock: std::fs::File,
}

/// openraft's configuration. A node of a cluster elects after a pre-vote
/// (`node::election`), so openraft's own election timer is on only for a node without one.
fn raft_config(own_elections: bool, every: u64) -> Result<Arc<openraft::Config>, NodeError> {
    let every = every.max(1);
    let config = openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: 100,
        election_timeout_min: election::ELECTION_TIMEOUT_MIN,
        election_timeout_max: election::ELECTION_TIMEOUT_MAX,
        enable_elect: own_elections,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(every),
        // openraft's purge is off: `compact` purges by count, bytes and the snapshots being
        // sent.
        max_in_snapshot_log_to_keep: u64::MAX,
        // Each snapshot chunk (openraft sends a snapshot in chunks of 3 MiB) gets this long to
        // cross a slow link, rather than the 2 s of other calls; the last one is answered once
        // the whole snapshot is installed, 30 to 40 s for a million files. A timeout resets the
        // connection, which failed a joining node's AddMember under way on it. A peer that
        // died is found sooner by the QUIC idle timeout (10 s).
        install_snapshot_timeout: 600_000,
        ..Default::default()
    };
    Ok(Arc::new(
        config
            .validate()
            .map_err(|e| NodeError::Raft(e.to_string()))?,
    ))
}

fn lock_data_dir(data: &Path) -> Result<std::fs::File, NodeError> {
    let path = data.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| NodeError::Io(path.clone(), e))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(NodeError::Locked(data.to_path_buf())),
        Err(e) => Err(NodeError::Io(path, e.into())),
    }
}

async fn open_raft(
    id: u64,
    data: &Path,
    cluster: Option<&crate::cluster::Cluster>,
    hook: Option<shoal_raft::ApplyHook>,
    snapshot_every: u64,
) -> Result<OpenedRaft, NodeError> {
    // The data dir's LOCK is ours, so a busy sled lock can only be this process's previous Raft
    // instance still shutting down (init, then start): wait for it briefly.
    let mut tries = 0;
    let (log, sm) = loop {
        match shoal_raft::open(&data.join("meta")) {
            Ok(stores) => break stores,
            Err(shoal_raft::StoreError::Sled(sled::Error::Io(e)))
                if tries < 100 && e.to_string().contains("could not acquire lock") =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let view = sm.view();
    let headroom = sm.headroom();
    let log_size = sm.log_size();
    let snapshot_sends = Arc::new(crate::cluster::network::SnapshotSends::default());
    if let Some(hook) = hook {
        sm.set_hook(hook);
    }
    let raft = match cluster {
        Some(c) => {
            let network = crate::cluster::network::QuicNetwork {
                peers: c.peers.clone(),
                snapshot_sends: snapshot_sends.clone(),
            };
            Raft::new(id, raft_config(false, snapshot_every)?, network, log, sm).await
        }
        None => Raft::new(id, raft_config(true, snapshot_every)?, NoPeers, log, sm).await,
    }
    .map_err(|e| NodeError::Raft(e.to_string()))?;
    Ok(OpenedRaft {
        raft,
        view,
        headroom,
        log_size,
        snapshot_sends,
    })
}

struct OpenedRaft {
    raft: Raft,
    view: StateView,
    headroom: Arc<shoal_raft::headroom::Headroom>,
    log_size: Arc<shoal_raft::LogSize>,
    snapshot_sends: Arc<crate::cluster::network::SnapshotSends>,
}

async fn wait_leader(raft: &Raft, id: u64) -> Result<(), NodeError> {
    raft.wait(Some(Duration::from_secs(30)))
        .state(ServerState::Leader, "become leader")
        .await
        .map_err(|e| NodeError::Raft(format!("node {id} did not become leader: {e}")))?;
    Ok(())
}

/// Creates a new cluster in `data` with this node as its only member. With `listen`, the node
/// gets a CA, a certificate and a join token so that other nodes can join it.
pub async fn init(
    data: &Path,
    block_size: u32,
    listen: Option<std::net::SocketAddr>,
    cert_validity: Duration,
) -> Result<ClusterConfig, NodeError> {
    crate::private::create_data_dir(data).map_err(|e| NodeError::Io(data.to_path_buf(), e))?;
    if let Ok(existing) = ClusterConfig::load(data) {
        return Err(NodeError::AlreadyInitialized(
            data.to_path_buf(),
            existing.cluster_id,
        ));
    }
    let _lock = lock_data_dir(data)?;
    let config = ClusterConfig {
        node_id: 1,
        cluster_id: format!("{:016x}", rand::random::<u64>()),
        block_size,
        listen: listen.map(|l| l.to_string()),
        peers: Vec::new(),
        client: false,
    };
    let token = match listen {
        Some(_) => Some(membership::init_tls(data, &config, cert_validity)?),
        None => None,
    };
    let OpenedRaft { raft, .. } = open_raft(
        config.node_id,
        data,
        None,
        None,
        NodeOptions::default().snapshot_every,
    )
    .await?;
    let addr = config.listen.clone().unwrap_or_default();
    let members = BTreeMap::from([(config.node_id, BasicNode::new(addr))]);
    raft.initialize(members)
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    wait_leader(&raft, config.node_id).await?;
    // The root directory is created by the first applied command.
    let cmds = token
        .map(|t| {
            vec![MetaCommand::SetJoinSecret {
                hash: t.secret_hash(),
            }]
        })
        .unwrap_or_default();
    raft.client_write(MetaRequest {
        now: now_nanos(),
        session: 0,
        seq: 0,
        acked: 0,
        cmds,
    })
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;
    raft.shutdown()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    config.save(data)?;
    Ok(config)
}

/// Drops `node` and returns once every other reference to it is gone too (its background
/// tasks hold weak ones), so its data directory can be opened again in this process; panics
/// after 30 s. For in-process restarts in tests.
pub async fn release(node: Arc<Node>) {
    let weak = Arc::downgrade(&node);
    drop(node);
    let deadline = Instant::now() + Duration::from_secs(30);
    while weak.strong_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "a stopped node is still referenced after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // openraft's tasks hold the sled handles a little longer.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

impl Node {
    /// Opens the node in `data` and makes it ready to serve: Raft running and leader, a new
    /// session opened, orphans of the last run purged. Does not mount anything.
    pub async fn start(data: &Path, options: NodeOptions) -> Result<Arc<Node>, NodeError> {
        let config = ClusterConfig::load(data)?;
        crate::private::check_data_dir(data).map_err(NodeError::Unsafe)?;
        let lock = lock_data_dir(data)?;
        let blocks = Arc::new(BlockStore::open(&data.join("blocks"))?);
        let cluster = match &config.listen {
            Some(listen) => {
                let addr = listen.parse().map_err(|e| {
                    NodeError::BadConfig(
                        data.join(CONFIG_FILE),
                        format!("listen address {listen:?}: {e}"),
                    )
                })?;
                Some(Arc::new(crate::cluster::Cluster::open(
                    data,
                    addr,
                    config.node_id,
                    options.network.clone(),
                )?))
            }
            None => None,
        };
        let resume = options.resume.clone();
        let session = Arc::new(AtomicU64::new(
            resume
                .as_ref()
                .map_or_else(|| rand::random::<u64>() | 1, |r| r.session),
        ));
        let notifier = Arc::new(std::sync::OnceLock::new());
        let locks_changed = Arc::new(Notify::new());
        let (purge_tx, purge_rx) = mpsc::unbounded_channel();
        let invalidator = crate::invalidate::Invalidator::start(notifier.clone());
        let hook = invalidator.hook(session.clone(), locks_changed.clone(), purge_tx.clone());
        let OpenedRaft {
            raft,
            view,
            headroom,
            log_size,
            snapshot_sends,
        } = open_raft(
            config.node_id,
            data,
            cluster.as_deref(),
            Some(hook),
            options.snapshot_every,
        )
        .await?;
        let node = Arc::new(Node {
            id: config.node_id,
            cache: Arc::new(BlockCache::new(options.cache_bytes)),
            options,
            data_dir: data.to_path_buf(),
            raft,
            view,
            blocks,
            session,
            epoch: AtomicU64::new(resume.as_ref().map_or(0, |r| r.epoch)),
            started: Instant::now(),
            rt: tokio::runtime::Handle::current(),
            files: Mutex::new(HashMap::new()),
            unreferenced_writes: Mutex::new(HashMap::new()),
            dirty_bytes: AtomicU64::new(0),
            repair_missing: AtomicU64::new(0),
            repair_rounds: AtomicU64::new(0),
            repair_fetched: AtomicU64::new(0),
            blocks_lost: AtomicU64::new(0),
            space_short: Arc::new(Notify::new()),
            headroom,
            log_size,
            snapshot_sends,
            space_warned: Default::default(),
            seen: Mutex::new(HashMap::new()),
            purge_tx,
            releasing: Mutex::new(Default::default()),
            next_seq: AtomicU64::new(first_seq()),
            in_flight: Mutex::new(Default::default()),
            locks_changed,
            handing_over: Default::default(),
            adopt_unknown: resume.is_some(),
            metrics: Default::default(),
            cluster,
            notifier,
            invalidator,
            _lock: lock,
            span: tracing::info_span!("node", id = config.node_id),
            config,
        });
        let span = node.span.clone();
        if let Some(c) = &node.cluster {
            span.in_scope(|| c.serve(Arc::downgrade(&node)));
            tokio::spawn(election::worker(Arc::downgrade(&node)).instrument(span.clone()));
            // Before anything waits on the cluster: a restarted node may hold a certificate
            // that expires soon, and the others cannot reach it once it has.
            tokio::spawn(trust::renew_worker(Arc::downgrade(&node)).instrument(span.clone()));
            let announcing = node.clone();
            tokio::spawn(
                async move { membership::announce_restart(&announcing).await }
                    .instrument(span.clone()),
            );
            ensure_member(&node).await?;
        } else {
            wait_leader(&node.raft, node.id).await?;
        }
        let resumed = match &resume {
            Some(r) => node.resume_session(r).await?,
            None => false,
        };
        if !resumed {
            node.run(MetaCommand::OpenSession {
                node: node.id,
                session: node.session(),
            })
            .await
            .map_err(|e| NodeError::Raft(format!("opening this run's session: {e}")))?;
        }
        node.record_session();
        // This run's session is applied here, so the view holds every layout committed before
        // it. A block no layout names is a leftover of a crash between writing a block and
        // committing it, unless another node pushed it lately and has yet to propose the
        // layout that names it: blocks younger than that guard wait for the hourly sweep.
        let min_age = replicate::RECEIVED_GUARD;
        match crate::blocks::gc::sweep_unreferenced(&node.blocks, &node.needed(), min_age) {
            Ok(0) => {}
            Ok(n) => info!(
                blocks = n,
                "removed blocks a crashed run wrote but never committed"
            ),
            Err(e) => warn!(error = %e, "startup sweep of unreferenced blocks failed"),
        }
        tokio::spawn(purge_worker(Arc::downgrade(&node), purge_rx).instrument(span.clone()));
        tokio::spawn(session_worker(Arc::downgrade(&node)).instrument(span.clone()));
        tokio::spawn(repair::worker(Arc::downgrade(&node)).instrument(span.clone()));

        tokio::spawn(file::commit_worker(Arc::downgrade(&node)).instrument(span.clone()));
        tokio::spawn(gc::worker(Arc::downgrade(&node)).instrument(span.clone()));
        tokio::spawn(spill::worker(Arc::downgrade(&node)).instrument(span.clone()));
        tokio::spawn(compact::worker(Arc::downgrade(&node)).instrument(span.clone()));
        info!(node = node.id, cluster = %node.config.cluster_id, "node started");
        Ok(node)
    }

    /// Takes the session `r` names over from the daemon that served the mount before; false
    /// when it has expired (that daemon was gone longer than the lease): a new session is then
    /// to be opened, and the handles of the old one are fenced, since its locks are gone.
    async fn resume_session(&self, r: &Resume) -> Result<bool, NodeError> {
        match self.run(MetaCommand::RenewSession).await {
            Ok(_) => {}
            Err(OpError::Fs(FsError::SessionExpired)) => {
                error!(
                    session = r.session,
                    "the previous daemon's session expired before this one took over: its locks are gone, and files it had open are fenced"
                );
                self.epoch.fetch_add(1, Ordering::AcqRel);
                self.session
                    .store(rand::random::<u64>() | 1, Ordering::Release);
                return Ok(false);
            }
            Err(e) => {
                return Err(NodeError::Raft(format!(
                    "taking over the previous daemon's session: {e}"
                )));
            }
        }
        match &r.open {
            Some(open) => {
                for &(ino, opens) in open {
                    if let Err(e) = self.adopt_open(ino, opens) {
                        warn!(ino, error = %e, "a file the previous daemon had open is gone");
                    }
                }
            }
            None => {
                let orphans = self
                    .view
                    .orphans()
                    .map_err(|e| NodeError::Raft(e.to_string()))?;
                for (ino, holders) in orphans {
                    if holders.contains(&r.session) {
                        let _ = self.adopt_open(ino, OPENS_UNKNOWN);
                    }
                }
            }
        }
        info!(
            session = r.session,
            handed = r.open.is_some(),
            "took over the previous daemon's session: its locks and open files stay"
        );
        Ok(true)
    }

    /// Writes this node's session and epoch to the data directory, for a daemon that takes
    /// the FUSE connection over from the service manager after this one died.
    fn record_session(&self) {
        let path = self.data_dir.join(SESSION_FILE);
        let tmp = path.with_extension("tmp");
        let text = format!("{} {}\n", self.session(), self.epoch());
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            warn!(path = %path.display(), error = %e, "cannot record this node's session; a restart after a crash will open a new one (locks of running processes lost)");
        }
    }

    /// The open files and how many kernel handles each has, for a successor.
    pub fn open_counts(&self) -> Vec<(Ino, usize)> {
        self.files
            .lock()
            .expect("files lock")
            .iter()
            .map(|(ino, f)| (*ino, f.opens.load(Ordering::SeqCst)))
            .filter(|(_, opens)| *opens > 0)
            .collect()
    }

    /// Ends lock waits (`OpError::Interrupted`): the mount is being handed over, and the
    /// successor takes them up.
    pub fn start_handing_over(&self) {
        self.handing_over.store(true, Ordering::SeqCst);
        self.locks_changed.notify_waiters();
    }

    /// The hand-over failed and this daemon serves on.
    pub fn stop_handing_over(&self) {
        self.handing_over.store(false, Ordering::SeqCst);
    }

    /// Proposes a batch of commands through Raft; returns once they are durable and applied.
    /// However often it is sent (a retry after a lost answer, a resend here after this node
    /// was elected), it applies once: it carries this node's session and a number of its own.
    pub async fn propose(&self, cmds: Vec<MetaCommand>) -> OpResult<Vec<Result<Reply, FsError>>> {
        // Numbered and registered in one step: a number taken but not yet in flight would let
        // a later proposal claim it answered (`acked`), and the state machine would then
        // refuse it as a late copy.
        let (seq, acked) = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            in_flight.insert(seq);
            (seq, *in_flight.first().expect("just inserted"))
        };
        let req = MetaRequest {
            now: now_nanos(),
            session: self.session(),
            seq,
            acked,
            cmds,
        };
        let result = self.propose_numbered(req).await;
        self.in_flight.lock().expect("in-flight lock").remove(&seq);
        result
    }

    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(node = self.id, seq = req.seq, log_index = tracing::field::Empty)
    )]
    async fn propose_numbered(
        &self,
        mut req: MetaRequest,
    ) -> OpResult<Vec<Result<Reply, FsError>>> {
        loop {
            // Keep a copy to forward only where there is a leader to forward to.
            let copy = self.cluster.is_some().then(|| req.clone());
            let written = tokio::time::timeout(PROPOSE_PATIENCE, self.raft.client_write(req)).await;
            let Ok(written) = written else {
                error!(
                    "a metadata proposal did not complete in {PROPOSE_PATIENCE:?}; its outcome is unknown"
                );
                return Err(OpError::Raft(format!(
                    "no answer from Raft within {PROPOSE_PATIENCE:?}"
                )));
            };
            match written {
                Ok(resp) => {
                    tracing::Span::current().record("log_index", resp.log_id.index);
                    self.metrics.proposal(false);
                    return Ok(resp.data.results);
                }
                Err(openraft::error::RaftError::APIError(
                    openraft::error::ClientWriteError::ForwardToLeader(_),
                )) if let Some(copy) = copy => match self.forward(copy).await? {
                    Ok(resp) => {
                        self.metrics.proposal(true);
                        return Ok(resp.results);
                    }
                    // This node was elected while the proposal waited: propose it here.
                    Err(back) => req = back,
                },
                Err(e) => {
                    error!(error = %e, "metadata proposal failed");
                    return Err(OpError::Raft(e.to_string()));
                }
            }
        }
    }

    /// Proposes a request that came from another node: only the leader accepts it. Returns the
    /// log index it was applied at, with the results.
    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(node = self.id, seq = req.seq, log_index = tracing::field::Empty)
    )]
    pub(crate) async fn propose_request(
        &self,
        req: MetaRequest,
    ) -> Result<(u64, shoal_raft::MetaResponse), Refusal> {
        let resp = self
            .raft
            .client_write(req)
            .await
            .map_err(Refusal::of_write)?;
        tracing::Span::current().record("log_index", resp.log_id.index);
        Ok((resp.log_id.index, resp.data))
    }

    /// Sends a proposal to the leader and waits until this node has applied it too, so the
    /// caller reads its own write. Gives the proposal back if this node became the leader.
    async fn forward(
        &self,
        req: MetaRequest,
    ) -> OpResult<Result<shoal_raft::MetaResponse, MetaRequest>> {
        use crate::cluster::rpc::{Request, Response};
        let req = Request::Propose(req);
        let answer = self
            .ask_leader(&req, |r| match r {
                Response::Propose(answer) => Some(answer),
                _ => None,
            })
            .await?;
        let Some((index, resp)) = answer else {
            let Request::Propose(req) = req else {
                unreachable!("built above")
            };
            return Ok(Err(req));
        };
        tracing::Span::current().record("log_index", index);
        self.wait_applied(index, "apply a forwarded proposal")
            .await?;
        Ok(Ok(resp))
    }

    /// Makes the reads that follow linearizable: learns the leader's commit index after
    /// the leader confirmed its leadership with a quorum (Raft's read index), and waits until
    /// this node has applied that far. A file closed on another node before this call started
    /// is seen with its new contents after it. Without a cluster there is nothing to wait for.
    pub async fn read_barrier(&self) -> OpResult<()> {
        use crate::cluster::rpc::{Request, Response};
        use openraft::error::{CheckIsLeaderError, RaftError};
        if self.cluster.is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + FORWARD_PATIENCE;
        let index = loop {
            // A round in which no quorum answered (a follower restarting, connections being
            // made again after a CA was retired, a moment of loss) is asked again: an
            // election settles it within the same patience as a forward.
            let read = (|| self.raft.get_read_log_id())
                .retry(settle(Duration::from_millis(50)))
                .sleep(tokio::time::sleep)
                .when(|e| {
                    matches!(
                        e,
                        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))
                    ) && Instant::now() < deadline
                })
                .notify(
                    |e, _| debug!(error = %e, "read index: no quorum answered yet; asking again"),
                )
                .await;
            match read {
                Ok((read, _)) => break read.map(|l| l.index),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                    let asked = self
                        .ask_leader(&Request::ReadIndex, |r| match r {
                            Response::ReadIndex(answer) => Some(answer),
                            _ => None,
                        })
                        .await?;
                    // `None`: this node leads now; ask itself.
                    if let Some(index) = asked {
                        break index;
                    }
                }
                Err(e) => return Err(OpError::Raft(format!("read index: {e}"))),
            }
        };
        match index {
            Some(index) => self.wait_applied(index, "apply up to the read index").await,
            None => Ok(()),
        }
    }

    async fn wait_applied(&self, index: u64, why: &'static str) -> OpResult<()> {
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .applied_index_at_least(Some(index), why)
            .await
            .map(drop)
            .map_err(|e| OpError::Raft(format!("waiting to apply log index {index}: {e}")))
    }

    /// Sends a request to the leader and returns its answer, which `answer` takes out of the
    /// response; `None` if this node became the leader meanwhile. While the cluster elects a
    /// new leader (none known, unreachable, or the node asked no longer leads), retries for a
    /// while.
    async fn ask_leader<T>(
        &self,
        req: &crate::cluster::rpc::Request,
        answer: impl Fn(crate::cluster::rpc::Response) -> Option<Result<T, Refusal>>,
    ) -> OpResult<Option<T>> {
        /// Why one attempt failed.
        enum Failed {
            /// The node we took for the leader refused.
            Refused(Refusal),
            /// No leader known, or it did not answer.
            Unreachable(OpError),
            /// An answer of another kind.
            Unexpected,
        }
        let deadline = Instant::now() + FORWARD_PATIENCE;
        let attempt = || async {
            if self.raft.metrics().borrow().current_leader == Some(self.id) {
                return Ok(None);
            }
            match self.to_leader(req).await.map(&answer) {
                Ok(Some(Ok(v))) => Ok(Some(v)),
                Ok(Some(Err(e))) => Err(Failed::Refused(e)),
                Ok(None) => Err(Failed::Unexpected),
                Err(e) => Err(Failed::Unreachable(e)),
            }
        };
        attempt
            .retry(settle(Duration::from_millis(50)))
            .sleep(tokio::time::sleep)
            // The node we took for the leader no longer is one, or no quorum answered it this
            // round, or there is none yet: an election settles it.
            .when(|f| {
                Instant::now() < deadline
                    && match f {
                        Failed::Refused(e) => e.is_transient(),
                        Failed::Unreachable(_) => true,
                        Failed::Unexpected => false,
                    }
            })
            .notify(|f, _| {
                if let Failed::Unreachable(e) = f {
                    debug!(error = %e, "asking the leader failed; waiting for a leader");
                }
            })
            .await
            .map_err(|f| match f {
                Failed::Refused(e) => OpError::Raft(format!("the leader refused: {e}")),
                Failed::Unreachable(e) => {
                    warn!(error = %e, "no leader answered within {FORWARD_PATIENCE:?}");
                    e
                }
                Failed::Unexpected => OpError::Raft("unexpected response from the leader".into()),
            })
    }

    /// Proposes one command and returns its reply.
    pub async fn run(&self, cmd: MetaCommand) -> OpResult<Reply> {
        let mut results = self.propose(vec![cmd]).await?;
        match results.pop() {
            Some(r) => Ok(r?),
            None => Err(OpError::Raft("empty response".into())),
        }
    }

    /// Commits every buffered write and stops Raft.
    pub async fn shutdown(&self) {
        let files: Vec<Arc<OpenFile>> = self
            .files
            .lock()
            .expect("files lock")
            .values()
            .cloned()
            .collect();
        for f in files {
            if let Err(e) = f.commit(self).await {
                error!(ino = f.ino, error = %e, "could not commit buffered writes at shutdown");
            }
        }
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        if let Some(c) = &self.cluster {
            c.close().await;
        }
        if let Err(e) = self.view_flush() {
            warn!(error = %e, "metadata flush at shutdown");
        }
        info!(node = self.id, "node stopped");
    }

    fn view_flush(&self) -> Result<(), shoal_raft::StoreError> {
        self.view.flush()
    }

    /// What tells this node's garbage blocks from needed ones (`blocks::gc`).
    pub(crate) fn needed(&self) -> crate::blocks::gc::Needed<'_> {
        crate::blocks::gc::Needed {
            writes: &self.unreferenced_writes,
            view: &self.view,
        }
    }

    /// Asks the purge worker to delete `ino` if its last link is gone and it is not open here.
    pub(crate) fn maybe_purge(&self, ino: Ino) {
        let _ = self.purge_tx.send(ino);
    }

    /// Refuses new data with ENOSPC while the data disk has less than the reserve free, so the
    /// Raft log and state machine always have room to record what was already accepted.
    pub fn check_space(&self, incoming: u64) -> OpResult<()> {
        // The disk filled up past the node's own reserve, and the metadata lives on the space
        // it kept aside: no file data until that is taken back.
        let short = !self.headroom.restore(SPACE_RESERVE);
        let st = rustix::fs::statvfs(&self.data_dir).map_err(|e| OpError::Disk(e.into()))?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if short || free < SPACE_RESERVE.saturating_add(incoming) {
            // Deleted files' blocks are garbage waiting out their grace: collect them now.
            self.space_short.notify_one();
            self.warn_space(free, incoming);
            return Err(OpError::NoSpace);
        }
        Ok(())
    }

    /// Logs a full disk at most once every `SPACE_WARN_EVERY`, with the refusals since the last
    /// line: a writer retrying in a loop must not flood the log.
    fn warn_space(&self, free: u64, incoming: u64) {
        let now = now_nanos();
        let (last, since) = &self.space_warned;
        let refused = since.fetch_add(1, Ordering::Relaxed) + 1;
        let prev = last.load(Ordering::Relaxed);
        if now - prev >= SPACE_WARN_EVERY.as_nanos() as i64
            && last
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            since.store(0, Ordering::Relaxed);
            warn!(
                free,
                incoming,
                refused,
                "data disk is full; refusing new data with ENOSPC (delete files to make room: their blocks are collected at once)"
            );
        }
    }

    /// Drops `/volumes/NAME` from this node's kernel caches now, before the caller answers:
    /// a volume command moved or made that directory in the state machine, without a FUSE
    /// request that would have told the kernel (the apply hook does it too, a moment later).
    pub(crate) fn forget_volume_entry(&self, name: &str) {
        use std::os::unix::ffi::OsStrExt;
        let Some(n) = self.notifier.get() else { return };
        let Ok(Some(volumes)) = self
            .view
            .lookup(shoal_raft::ROOT_INO, shoal_raft::VOLUMES_DIR)
        else {
            return;
        };
        let r = n.inval_entry(
            fuser::INodeNo(volumes.ino),
            std::ffi::OsStr::from_bytes(name.as_bytes()),
        );
        if let Err(e) = r
            && e.kind() != std::io::ErrorKind::NotFound
        {
            debug!(volume = name, error = %e, "dropping a volume's cached entry failed");
        }
    }

    /// The node's root span; tasks started for it run in it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// This daemon run's current session.
    pub fn session(&self) -> u64 {
        self.session.load(Ordering::Acquire)
    }

    /// How long ago, by this node's clock against the leader's stamps, this node's session
    /// lease was last renewed; `None` while the view holds no lease of it.
    pub fn session_age(&self) -> Option<Duration> {
        let own = self.session();
        let (_, _, until) = self
            .view
            .sessions()
            .ok()?
            .into_iter()
            .find(|(s, _, _)| *s == own)?;
        let renewed = until - shoal_raft::SESSION_LEASE;
        Some(Duration::from_nanos((now_nanos() - renewed).max(0) as u64))
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }
}

/// Lets go of unlinked inodes this node's session holds and has no handle on, a batch per
/// Raft entry; the last holder's release deletes the inode. Told by the unlink and close
/// paths here, and by the Raft apply when another node's unlink made an orphan.
async fn purge_worker(node: std::sync::Weak<Node>, mut rx: mpsc::UnboundedReceiver<Ino>) {
    while let Some(first) = rx.recv().await {
        let Some(node) = node.upgrade() else { return };
        let mut inos = std::collections::BTreeSet::from([first]);
        while let Ok(more) = rx.try_recv() {
            inos.insert(more);
        }
        let session = node.session();
        let inos: Vec<Ino> = {
            let files = node.files.lock().expect("files lock");
            let mut releasing = node.releasing.lock().expect("releasing lock");
            inos.into_iter()
                .filter(|ino| !files.contains_key(ino))
                .filter(|ino| {
                    matches!(node.view.orphan(*ino), Ok(Some(holders)) if holders.contains(&session))
                })
                .filter(|ino| releasing.insert(*ino))
                .collect()
        };
        if inos.is_empty() {
            continue;
        }
        let cmds = inos.iter().map(|&ino| MetaCommand::Purge { ino }).collect();
        if let Err(e) = node.propose(cmds).await {
            warn!(error = %e, "letting go of unlinked files failed; this session's end lets go of them");
        }
        let mut releasing = node.releasing.lock().expect("releasing lock");
        for ino in inos {
            releasing.remove(&ino);
        }
    }
}

/// Keeps this node's session alive, and on the leader ends the sessions of nodes that stopped
/// renewing theirs. A node that finds its own session expired opens a new one and fences the
/// files it had open.
async fn session_worker(node: std::sync::Weak<Node>) {
    let renew_every = Duration::from_nanos(shoal_raft::SESSION_LEASE as u64 / 5);
    let mut tick = tokio::time::interval(renew_every);
    let mut reported_issuer = None;
    for round in 0u64.. {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        // Space kept for metadata that a full disk took comes back here even if no one writes.
        node.headroom.restore(SPACE_RESERVE);
        let mut cmds = vec![MetaCommand::RenewSession];
        let issuer = node
            .cluster()
            .map(|c| c.identity.lock().expect("identity lock").issuer())
            .unwrap_or_default();
        // Every tenth renewal also reports the data disk, for `shoal node ls` and placement,
        // and so does the first after a new certificate (`shoal ca retire` waits for it).
        if (round % 10 == 0 || reported_issuer != Some(issuer))
            && let Ok(st) = rustix::fs::statvfs(&node.data_dir)
        {
            reported_issuer = Some(issuer);
            cmds.push(MetaCommand::ReportNode {
                node: node.id,
                disk_total: st.f_blocks.saturating_mul(st.f_frsize),
                disk_free: st.f_bavail.saturating_mul(st.f_frsize),
                hostname: rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned(),
                issuer,
            });
        }
        let renewed =
            node.propose(cmds)
                .await
                .and_then(|results| match results.into_iter().next() {
                    Some(r) => Ok(r?),
                    None => Err(OpError::Raft("empty response".into())),
                });
        match renewed {
            Ok(_) => {}
            Err(OpError::Fs(FsError::SessionExpired)) => {
                let old = node.session();
                let new = rand::random::<u64>() | 1;
                error!(
                    old_session = old,
                    new_session = new,
                    "this node's session expired (was it frozen or cut off?): its locks are gone; files open until now are fenced"
                );
                node.epoch.fetch_add(1, Ordering::AcqRel);
                node.session.store(new, Ordering::Release);
                node.record_session();
                if let Err(e) = node
                    .run(MetaCommand::OpenSession {
                        node: node.id,
                        session: new,
                    })
                    .await
                {
                    error!(error = %e, "opening a new session failed; retrying");
                }
            }
            Err(e) => warn!(error = %e, "renewing this node's session failed; retrying"),
        }
        let leader = node.raft.metrics().borrow().current_leader == Some(node.id);
        if leader {
            let now = now_nanos();
            let expired = node
                .view
                .sessions()
                .map(|s| s.iter().any(|(_, _, until)| *until < now))
                .unwrap_or(false);
            if expired {
                if let Err(e) = node.run(MetaCommand::ExpireSessions).await {
                    warn!(error = %e, "ending expired sessions failed; retrying");
                }
                node.locks_changed.notify_waiters();
            }
            if round % 10 == 5 {
                purge_expired_trash(&node).await;
            }
        }
    }
}

/// On the leader: deletes the volumes that stayed in the trash longer than the cluster's
/// retention (`shoal volume retention`).
async fn purge_expired_trash(node: &Node) {
    let (Ok(volumes), Ok(settings)) = (node.view.trash(), node.view.settings()) else {
        return;
    };
    let now = now_nanos();
    for v in volumes {
        let Some(trashed) = v.trashed else { continue };
        if trashed.saturating_add(settings.trash_retention) > now {
            continue;
        }
        let cmd = MetaCommand::PurgeVolume {
            name: v.name.clone(),
            id: Some(v.root),
            trashed: Some(trashed),
        };
        match node.run(cmd).await {
            Ok(_) => info!(volume = %v.name, "purged a volume whose time in the trash ran out"),
            Err(e) => {
                warn!(volume = %v.name, error = %e, "purging an expired volume from the trash failed; retrying")
            }
        }
    }
}
