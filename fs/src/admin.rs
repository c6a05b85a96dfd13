//! The admin socket: `DATA/admin.sock`, one length-prefixed JSON request and reply per
//! connection, used by `shoal status` and friends to talk to the running daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_net::frame;
use tokio::net::UnixStream;
use tracing::{Instrument, debug, info, warn};

use shoal_raft::FsError;

pub use crate::node::members::{Disk, Member};
use crate::node::members::{members, node_name};
use crate::node::{Node, OpError};
use crate::volumes::VolumeError;

pub const SOCKET: &str = "admin.sock";
/// The largest admin request: a volume command with its options is a few hundred bytes.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Serialize, Deserialize, Debug)]
pub enum AdminRequest {
    Status,
    Members,
    RemoveNode(u64),
    RotateToken,
    /// Replaces the cluster CA (`shoal ca rotate`); answers the new join token.
    RotateCa,
    /// Stops accepting the CA a rotation replaced (`shoal ca retire`).
    RetireCa,
    /// `shoal fsck`: checks the referenced blocks after `after` (at most `limit`), or `only`.
    Fsck {
        after: Option<shoal_raft::BlockId>,
        limit: u32,
        only: Vec<shoal_raft::BlockId>,
    },
    /// `shoal fsck --repair`: copies good copies to the nodes that lack them.
    FsckRepair(Vec<shoal_raft::BlockId>),
    /// `shoal fsck`: every member's blocks on disk that no layout references; with `delete`
    /// (`--repair`), deleted.
    Unreferenced {
        delete: bool,
    },
    /// A volume command of `shoal volume`.
    Volume(VolumeRequest),
    /// Sets (`Some`) or removes (`None`) a node label.
    Label {
        node: u64,
        key: String,
        value: Option<String>,
    },
    /// Arms a failpoint (`shoal debug failpoint`; only in a build with `--features failpoints`).
    Failpoint {
        name: String,
        actions: String,
    },
    /// Every member's re-replication (`shoal node rm` waits until none lacks a copy).
    Repair,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum VolumeRequest {
    Create {
        name: String,
        options: std::collections::BTreeMap<String, String>,
    },
    List,
    Inspect(String),
    Remove(String),
    /// Restore the removed volume `name`: its generation `id`, or the newest; under `rename`.
    Restore {
        name: String,
        id: Option<u64>,
        rename: Option<String>,
    },
    /// Purge the removed volume `name`: its generation `id`, or its only one.
    Purge {
        name: String,
        id: Option<u64>,
    },
    /// Show, or set (seconds), how long removed volumes stay in the trash.
    Retention(Option<u64>),
    /// Forget the mounts recorded for a node.
    ForgetMounts(u64),
}

/// A volume as `shoal volume ls|inspect` shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    /// Its identity, which tells removed volumes of one name apart (its root inode).
    pub id: u64,
    /// `active`, or `trash` once removed.
    pub state: String,
    /// Bytes of file content in it (the sizes of its files and symlinks).
    pub used: u64,
    /// The quota in bytes (`size=`), if any.
    pub quota: Option<u64>,
    /// Files, directories and symlinks below its root.
    pub entries: u64,
    /// Copies of each block (the cluster default when not set).
    pub replicas: u32,
    /// Node label rules its replicas keep to, e.g. `storage==ssd`.
    pub placement: String,
    /// The volume it was cloned from.
    pub from: Option<String>,
    /// When it was created and, in the trash, removed (Unix seconds).
    pub created: i64,
    pub trashed: Option<i64>,
    /// When the trash purges it for good, if nobody restores it (Unix seconds).
    pub purge_after: Option<i64>,
    /// Where it is mounted: node and the number of Docker mounts there.
    pub mounts: Vec<VolumeMounts>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VolumeMounts {
    pub node: u64,
    /// The node as people know it: `host (node N, address)`.
    pub name: String,
    pub count: usize,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum AdminReply {
    Status(Box<Status>),
    Members(Vec<Member>),
    Volumes(Vec<VolumeInfo>),
    /// The trash retention, in seconds.
    Retention(u64),
    Done,
    Token(String),
    Fsck(crate::node::fsck::FsckBatch),
    /// Block copies made by `FsckRepair`.
    Repaired(u64),
    /// Each member's unreferenced blocks, or why it did not answer.
    Unreferenced(Vec<(u64, Result<crate::blocks::gc::Unreferenced, String>)>),
    /// Each member's re-replication, or why it did not answer.
    Repair(Vec<(u64, Result<crate::cluster::rpc::RepairState, String>)>),
    Error(String),
}

fn must_be_member(node: &Node, id: u64) -> Result<(), String> {
    if members(node)?.iter().any(|m| m.id == id) {
        Ok(())
    } else {
        Err(format!(
            "there is no node {id} in this cluster: it is not a member (see `shoal node ls`)"
        ))
    }
}

/// Serves `shoal volume`: the same commands the Docker plugin proposes, with its messages.
async fn volume(node: &Arc<Node>, req: VolumeRequest) -> Result<AdminReply, VolumeError> {
    use shoal_raft::MetaCommand;
    let (name, cmd) = match req {
        VolumeRequest::List => {
            node.read_barrier().await?;
            let mut vs = node.view.volumes()?;
            vs.extend(node.view.trash()?);
            let infos = vs
                .into_iter()
                .map(|v| volume_info(node, v))
                .collect::<Result<_, _>>()?;
            return Ok(AdminReply::Volumes(infos));
        }
        VolumeRequest::Inspect(name) => {
            node.read_barrier().await?;
            let v = node
                .view
                .volume(&name)?
                .ok_or(VolumeError::NotFound(name))?;
            return Ok(AdminReply::Volumes(vec![volume_info(node, v)?]));
        }
        VolumeRequest::Create { name, options } => {
            crate::volumes::create_volume(node, &name, &options).await?;
            return Ok(AdminReply::Done);
        }
        VolumeRequest::Remove(name) => (name.clone(), MetaCommand::TrashVolume { name }),
        VolumeRequest::Restore { name, id, rename } => {
            return restore(node, name, id, rename).await;
        }
        VolumeRequest::Purge { name, id } => {
            shoal_raft::check_volume_name(&name)?;
            let cmd = MetaCommand::PurgeVolume {
                name: name.clone(),
                id,
                trashed: None,
            };
            return match node.run(cmd).await {
                Ok(_) => Ok(AdminReply::Done),
                Err(OpError::Fs(FsError::Ambiguous)) => Err(VolumeError::AmbiguousTrash {
                    ids: trashed_ids(node, &name),
                    name,
                }),
                Err(OpError::Fs(FsError::NotFound)) if let Some(id) = id => {
                    Err(VolumeError::NotInTrashWithId { name, id })
                }
                Err(e) => Err(crate::volumes::explain(&name, e, node)),
            };
        }
        VolumeRequest::ForgetMounts(id) => {
            must_be_member(node, id).map_err(VolumeError::Cluster)?;
            node.run(MetaCommand::ClearMounts { node: id }).await?;
            return Ok(AdminReply::Done);
        }
        VolumeRequest::Retention(set) => {
            if let Some(secs) = set {
                let nanos = i64::try_from(secs.saturating_mul(1_000_000_000))
                    .map_err(|_| VolumeError::RetentionTooLong(secs))?;
                node.run(MetaCommand::SetTrashRetention { nanos }).await?;
            }
            node.read_barrier().await?;
            let r = shoal_raft::Kv::settings(&node.view)?;
            return Ok(AdminReply::Retention(
                (r.trash_retention / 1_000_000_000) as u64,
            ));
        }
    };
    shoal_raft::check_volume_name(&name)?;
    node.run(cmd)
        .await
        .map_err(|e| crate::volumes::explain(&name, e, node))?;
    node.forget_volume_entry(&name);
    Ok(AdminReply::Done)
}

/// The ids of the removed volumes named `name`, oldest first.
fn trashed_ids(node: &Node, name: &str) -> String {
    node.view
        .trash()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.name == name)
        .map(|v| v.root.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn restore(
    node: &Node,
    name: String,
    id: Option<u64>,
    rename: Option<String>,
) -> Result<AdminReply, VolumeError> {
    use shoal_raft::MetaCommand;
    shoal_raft::check_volume_name(&name)?;
    let to = rename.clone().unwrap_or_else(|| name.clone());
    shoal_raft::check_volume_name(&to)?;
    let cmd = MetaCommand::RestoreVolume {
        name: name.clone(),
        id,
        rename,
    };
    match node.run(cmd).await {
        Ok(_) => {
            node.forget_volume_entry(&to);
            Ok(AdminReply::Done)
        }
        Err(OpError::Fs(FsError::Exists)) => Err(VolumeError::LiveNamed { name, to }),
        Err(OpError::Fs(FsError::NotFound)) => Err(match id {
            Some(id) => VolumeError::NotInTrashWithId { name, id },
            None => VolumeError::NoneInTrash(name),
        }),
        Err(e) => Err(crate::volumes::explain(&name, e, node)),
    }
}

/// A volume as the CLI shows it, with the usage the state machine keeps.
fn volume_info(node: &Node, v: shoal_raft::Volume) -> Result<VolumeInfo, VolumeError> {
    use shoal_raft::Kv;
    let usage = node.view.volume_usage(v.root)?.unwrap_or_default();
    let retention = node.view.settings()?.trash_retention;
    let secs = |t: i64| t.div_euclid(1_000_000_000);
    let mounts = v
        .mounts_per_node()
        .into_iter()
        .map(|(id, count)| VolumeMounts {
            node: id,
            name: node_name(node, id),
            count,
        })
        .collect();
    Ok(VolumeInfo {
        id: v.root,
        state: if v.trashed.is_some() {
            "trash"
        } else {
            "active"
        }
        .into(),
        used: usage.bytes,
        quota: v.options.size,
        entries: usage.inodes.saturating_sub(1),
        replicas: v
            .options
            .replicas
            .unwrap_or(crate::node::replicate::REPLICAS as u32),
        placement: v.options.placement_text(),
        from: v.options.from.clone(),
        created: secs(v.created),
        trashed: v.trashed.map(secs),
        purge_after: v.trashed.map(|t| secs(t.saturating_add(retention))),
        mounts,
        name: v.name,
    })
}

/// Sets or removes a label of a member node.
async fn label(node: &Node, id: u64, key: String, value: Option<String>) -> Result<(), String> {
    shoal_raft::check_label(&key, value.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
    if key.starts_with("shoal.") {
        return Err(format!(
            "label key {key:?}: keys starting with 'shoal.' are shoal's own (a client node is made with `shoal join --client`)"
        ));
    }
    must_be_member(node, id)?;
    node.run(shoal_raft::MetaCommand::SetNodeLabel {
        node: id,
        key,
        value,
    })
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    pub version: String,
    pub node_id: u64,
    pub cluster_id: String,
    pub raft_state: String,
    pub leader: Option<u64>,
    /// On a leader: milliseconds since a quorum last acknowledged it. A leader cut off from
    /// the others keeps its role until it hears of a newer term, but this grows.
    pub quorum_ack_ms: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// The last log index purged from the log after a snapshot: a node further behind than
    /// this catches up by installing a snapshot.
    pub purged: Option<u64>,
    /// The last log index covered by this node's current snapshot.
    pub snapshot: Option<u64>,
    pub mount: Option<String>,
    pub uptime_secs: u64,
    pub inodes: u64,
    pub blocks: u64,
    pub block_bytes: u64,
    /// Blocks some file's layout references, cluster-wide.
    pub referenced_blocks: u64,
    pub disk_free_bytes: u64,
    pub cache_bytes: u64,
    pub dirty_bytes: u64,
    pub open_files: usize,
    /// Blocks this node should hold (its share of the replicas) and lacks.
    pub under_replicated: u64,
    /// Blocks this node fetched to restore replicas or replace damaged copies since it started.
    pub repaired: u64,
    /// Block reads since start that found no good copy on any node (each an EIO).
    pub lost: u64,
    /// The data disk filled up and the metadata lives on the space kept for it: file data is
    /// refused until the disk has room again (`shoal_raft::headroom`).
    #[serde(default)]
    pub headroom_spent: bool,
    /// What the node counted since it started (`shoal status --watch` shows the rates).
    #[serde(default)]
    pub totals: crate::metrics::Totals,
    /// Block reads served from the cache, and those that were not.
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_misses: u64,
    /// Blocks no file references any more, listed until every member deleted its copies.
    #[serde(default)]
    pub garbage_blocks: u64,
    /// Bytes of small commits held in the Raft state, not yet written out as block files.
    #[serde(default)]
    pub inline_bytes: u64,
}

pub fn socket_path(data: &Path) -> PathBuf {
    data.join(SOCKET)
}

pub fn status(node: &Node, mount: Option<&Path>) -> Status {
    let m = node.raft.metrics().borrow().clone();
    let (blocks, block_bytes) = node
        .blocks
        .list()
        .map(|l| (l.len() as u64, l.iter().map(|(_, n, _)| n).sum()))
        .unwrap_or((0, 0));
    let (cache_hits, cache_misses) = node.cache.hits();
    let disk_free_bytes = node
        .statfs(shoal_raft::ROOT_INO)
        .map(|s| s.bavail * u64::from(s.bsize))
        .unwrap_or(0);
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        node_id: node.id,
        cluster_id: node.config.cluster_id.clone(),
        raft_state: format!("{:?}", m.state),
        leader: m.current_leader,
        quorum_ack_ms: m.millis_since_quorum_ack,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        purged: m.purged.map(|l| l.index),
        snapshot: m.snapshot.map(|l| l.index),
        mount: mount.map(|p| p.display().to_string()),
        uptime_secs: node.started.elapsed().as_secs(),
        inodes: node.view.inode_count().unwrap_or(0),
        blocks,
        block_bytes,
        referenced_blocks: node.view.block_count().unwrap_or(0),
        disk_free_bytes,
        cache_bytes: node.cache.weight(),
        dirty_bytes: node.dirty_bytes(),
        headroom_spent: node.headroom.spent(),
        open_files: node.files.lock().map(|f| f.len()).unwrap_or(0),
        under_replicated: node
            .repair_missing
            .load(std::sync::atomic::Ordering::Relaxed),
        repaired: node
            .repair_fetched
            .load(std::sync::atomic::Ordering::Relaxed),
        lost: node.blocks_lost.load(std::sync::atomic::Ordering::Relaxed),
        totals: node.metrics.totals(),
        cache_hits,
        cache_misses,
        garbage_blocks: node.view.garbage(usize::MAX).map_or(0, |g| g.len() as u64),
        inline_bytes: node.view.inline_bytes().unwrap_or(0),
    }
}

/// Serves admin requests until the listener is dropped with the task.
pub async fn serve(node: Arc<Node>, mount: Option<PathBuf>) -> std::io::Result<()> {
    let path = socket_path(&node.data_dir);
    // The data directory is locked by this daemon, so a socket file left there is stale.
    let _ = std::fs::remove_file(&path);
    // Root only: the admin socket hands out join tokens and purges volumes.
    let listener = crate::private::bind_socket(&path, 0o600, None)?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let node = node.clone();
        let mount = mount.clone();
        tokio::spawn(
            async move {
                let req: AdminRequest = match frame::read_within(&mut conn, MAX_REQUEST).await {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(error = %e, "bad admin request");
                        let _ = frame::write(
                            &mut conn,
                            &AdminReply::Error(format!("bad request: {e}")),
                        )
                        .await;
                        return;
                    }
                };
                let reply = match req {
                    AdminRequest::Members => match members(&node) {
                        Ok(m) => AdminReply::Members(m),
                        Err(e) => AdminReply::Error(e),
                    },
                    AdminRequest::Volume(req) => match volume(&node, req).await {
                        Ok(r) => r,
                        Err(e) => AdminReply::Error(e.to_string()),
                    },
                    AdminRequest::Label {
                        node: id,
                        key,
                        value,
                    } => match label(&node, id, key, value).await {
                        Ok(()) => AdminReply::Done,
                        Err(e) => AdminReply::Error(e),
                    },
                    AdminRequest::RemoveNode(id) => match node.remove_member(id).await {
                        Ok(()) => AdminReply::Done,
                        Err(e) => AdminReply::Error(e.to_string()),
                    },
                    AdminRequest::RotateToken => match node.rotate_token().await {
                        Ok(t) => AdminReply::Token(t.to_string()),
                        Err(e) => AdminReply::Error(e.to_string()),
                    },
                    AdminRequest::RotateCa => match node.rotate_ca().await {
                        Ok(t) => AdminReply::Token(t.to_string()),
                        Err(e) => AdminReply::Error(e.to_string()),
                    },
                    AdminRequest::RetireCa => match node.retire_ca().await {
                        Ok(()) => AdminReply::Done,
                        Err(e) => AdminReply::Error(e.to_string()),
                    },
                    AdminRequest::Fsck { after, limit, only } => {
                        match crate::node::fsck::check(&node, after, limit as usize, only).await {
                            Ok(b) => AdminReply::Fsck(b),
                            Err(e) => AdminReply::Error(e.to_string()),
                        }
                    }
                    AdminRequest::FsckRepair(ids) => {
                        match crate::node::fsck::repair(&node, ids).await {
                            Ok(n) => AdminReply::Repaired(n),
                            Err(e) => AdminReply::Error(e.to_string()),
                        }
                    }
                    AdminRequest::Unreferenced { delete } => AdminReply::Unreferenced(
                        crate::node::fsck::unreferenced(&node, delete)
                            .await
                            .into_iter()
                            .map(|(n, a)| (n, a.map_err(|e| e.to_string())))
                            .collect(),
                    ),
                    AdminRequest::Repair => AdminReply::Repair(
                        crate::node::repair::cluster_state(&node)
                            .await
                            .into_iter()
                            .map(|(n, a)| (n, a.map_err(|e| e.to_string())))
                            .collect(),
                    ),
                    AdminRequest::Failpoint { name, actions } => {
                        match shoal_raft::failpoint::arm(&name, &actions) {
                            Ok(()) => {
                                info!(failpoint = name, actions, "failpoint armed");
                                AdminReply::Done
                            }
                            Err(e) => AdminReply::Error(e.to_string()),
                        }
                    }
                    AdminRequest::Status => {
                        let n = node.clone();
                        match tokio::task::spawn_blocking(move || status(&n, mount.as_deref()))
                            .await
                        {
                            Ok(s) => AdminReply::Status(Box::new(s)),
                            Err(e) => AdminReply::Error(e.to_string()),
                        }
                    }
                };
                if let Err(e) = frame::write(&mut conn, &reply).await {
                    warn!(error = %e, "admin reply failed");
                }
            }
            .in_current_span(),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no shoal daemon is running for {0}: start one with `shoal daemon --data {0}`")]
    NotRunning(String),
    #[error("talking to the daemon: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("the daemon says: {0}")]
    Remote(String),
}

pub async fn request(data: &Path, req: AdminRequest) -> Result<AdminReply, ClientError> {
    let path = socket_path(data);
    let mut conn = UnixStream::connect(&path)
        .await
        .map_err(|_| ClientError::NotRunning(data.display().to_string()))?;
    frame::write(&mut conn, &req).await?;
    match frame::read(&mut conn).await? {
        AdminReply::Error(e) => Err(ClientError::Remote(e)),
        reply => Ok(reply),
    }
}
