//! openraft storage on sled: the log store and the state machine.
//!
//! One sled database holds four trees: `log` (entries by index), `raft` (vote, committed and
//! purged log ids), `sm` (the state machine, see `keys`) and `snapshot` (the current snapshot).
//! sled only flushes by itself every 500 ms, so every write openraft must find after a crash
//! (appended entries, the vote, a truncation) is followed by one `flush_async` before openraft is
//! told it is durable; the entries of one `append` share that flush.
//!
//! openraft compacts the log by entry count (`SnapshotPolicy::LogsSinceLast`); an entry that
//! carries a small commit's blocks is up to 32 KiB, so the store also counts the log's bytes
//! since the last snapshot ([`LogSize`]) and the node asks for a snapshot by bytes.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::apply::{Txn, apply_request, ensure_root};
use crate::error::StoreError;
use crate::headroom::Headroom;
use crate::keys;
use crate::types::MetaResponse;
use crate::view::{Kv, StateView, decode, encode};
use crate::{MetaCommand, TypeConfig};

type NodeId = u64;
type SError = StorageError<NodeId>;
type Applied = (
    Option<LogId<NodeId>>,
    StoredMembership<NodeId, openraft::BasicNode>,
);

fn io_err<E: std::error::Error + 'static>(
    f: impl FnOnce(AnyError) -> StorageIOError<NodeId>,
    e: E,
) -> SError {
    f(AnyError::new(&e)).into()
}

/// Opens (or creates) the metadata database in `dir`.
pub fn open(dir: &std::path::Path) -> Result<(LogStore, StateMachine), StoreError> {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let headroom = Arc::new(Headroom::open(dir));
    let size = Arc::new(LogSize {
        log: db.open_tree("log")?,
        since_snapshot: AtomicU64::new(0),
        snapshot: AtomicU64::new(0),
    });
    let log = LogStore {
        headroom: headroom.clone(),
        size: size.clone(),
        log: db.open_tree("log")?,
        raft: db.open_tree("raft")?,
        db: db.clone(),
        committed: Arc::default(),
    };
    let sm = StateMachine {
        headroom,
        tree: db.open_tree("sm")?,
        snapshots: db.open_tree("snapshot")?,
        apply_lock: Arc::new(Mutex::new(())),
        hook: Arc::new(std::sync::OnceLock::new()),
        size,
        db,
    };
    log.catch_up_with(&sm)?;
    // What the log holds counts as grown since the snapshot: at most one snapshot early.
    let mut held = 0;
    for v in log.log.iter().values() {
        held += v?.len() as u64;
    }
    log.size.since_snapshot.store(held, Ordering::Relaxed);
    if let Some(v) = sm.snapshots.get(SNAPSHOT)? {
        log.size.snapshot.store(v.len() as u64, Ordering::Relaxed);
    }
    Ok((log, sm))
}

/// The Raft log's bytes appended since the last snapshot, the size of that snapshot, and how
/// far the log may be purged behind it by bytes.
///
/// A log that grows by bytes faster than by entries (small commits carry their blocks) would
/// hold gigabytes before openraft's count-based policy snapshots it: the three-node fsx run
/// filled 3.4 GB of disk that way. [`LogSize::wants_snapshot`] asks for a snapshot once the
/// log has grown by [`LogSize::MIN_BYTES`] or by the size of the last snapshot, whichever is
/// more, so the log on disk stays within a small multiple of the state, and the work of
/// snapshots stays in proportion to the bytes written (a large tree is not copied every few
/// seconds because small files are written). Behind a snapshot, openraft keeps a number of
/// entries for followers that lag; [`LogSize::purge_point`] tells how far to purge so that
/// those entries hold at most as many bytes.
pub struct LogSize {
    log: sled::Tree,
    since_snapshot: AtomicU64,
    snapshot: AtomicU64,
}

impl LogSize {
    /// The log grows by at least this much between two snapshots.
    pub const MIN_BYTES: u64 = 16 << 20;

    /// Bytes of entries appended since the last snapshot was built or installed.
    pub fn since_snapshot(&self) -> u64 {
        self.since_snapshot.load(Ordering::Relaxed)
    }

    /// The size of the last snapshot built or installed (0 before the first).
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot.load(Ordering::Relaxed)
    }

    /// Whether the log has grown enough since the last snapshot to take a new one.
    pub fn wants_snapshot(&self) -> bool {
        self.since_snapshot() > self.keep_bytes()
    }

    /// The bytes of entries kept behind a snapshot at most: as many as the log may grow by
    /// before the next one.
    pub fn keep_bytes(&self) -> u64 {
        Self::MIN_BYTES.max(self.snapshot_bytes())
    }

    /// The index up to which (inclusive) the log must be purged so that the entries after it,
    /// up to the snapshot's last index `snapshot`, hold at most `keep` bytes; `None` when they
    /// already do.
    pub fn purge_point(&self, snapshot: u64, keep: u64) -> Result<Option<u64>, StoreError> {
        let mut held = 0u64;
        for kv in self.log.range(..=snapshot.to_be_bytes()).rev() {
            let (k, v) = kv?;
            held += v.len() as u64;
            if held > keep {
                let index = k
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Invariant(format!("log key {k:?} is no index")))?;
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    fn appended(&self, bytes: u64) {
        self.since_snapshot.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot of `bytes` was taken when `since` bytes had been appended since the one
    /// before; what was appended meanwhile still counts.
    fn snapshotted(&self, bytes: u64, since: u64) {
        self.snapshot.store(bytes, Ordering::Relaxed);
        let _ = self
            .since_snapshot
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(now.saturating_sub(since))
            });
    }
}

// ---- log ----

impl LogStore {
    /// Makes the log agree with a state machine that is behind its purge point. openraft
    /// purges the log up to a snapshot it received while the state machine installs that
    /// snapshot; a crash in between (sled had flushed the purge, not the new state) left a
    /// log that claims entries as applied that the state machine never got, and a node that
    /// stopped at every start ("try to get log at index 147 but got None", twice in the soak's
    /// snapshot-install failpoint runs). When nothing follows the purge point, the log goes
    /// back to the state machine's last applied entry, which only undoes the install that did
    /// not finish (its snapshot was never acknowledged): the leader sends the snapshot again.
    fn catch_up_with(&self, sm: &StateMachine) -> Result<(), StoreError> {
        let purged: Option<LogId<NodeId>> = self.meta::<Option<LogId<NodeId>>>(PURGED)?.flatten();
        let applied = sm.applied()?.0;
        let Some(p) = purged else { return Ok(()) };
        if applied.is_some_and(|a| a.index >= p.index) {
            return Ok(());
        }
        if self
            .log
            .range((p.index + 1).to_be_bytes()..)
            .next()
            .is_some()
        {
            tracing::error!(
                purged = ?purged,
                applied = ?applied,
                "the state machine is behind the log's purge point and entries follow it: this node cannot catch up by itself; remove it and join it again"
            );
            return Ok(());
        }
        tracing::warn!(
            purged = ?purged,
            applied = ?applied,
            "the state machine is behind the log's purge point (a crash while installing a snapshot): going back to the last applied entry; the leader will send the snapshot again"
        );
        self.raft.insert(PURGED, encode(&applied))?;
        let committed: Option<LogId<NodeId>> =
            self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten();
        if committed.map(|c| c.index) > applied.map(|a| a.index) {
            self.raft.insert(COMMITTED, encode(&applied))?;
        }
        self.db.flush()?;
        Ok(())
    }
}

/// Fault injection for tests: while the file `SHOAL_FAULT_LOG_WRITE_FAILS` names exists,
/// appending to the log fails as a dying disk's writes would, which stops the Raft core for
/// good. Unset in production.
fn injected_write_failure() -> Option<std::io::Error> {
    let path = std::env::var_os("SHOAL_FAULT_LOG_WRITE_FAILS")?;
    std::path::Path::new(&path)
        .exists()
        .then(|| std::io::Error::other("fault injected: the log's disk failed a write"))
}

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    headroom: Arc<Headroom>,
    log: sled::Tree,
    raft: sled::Tree,
    /// The commit index openraft last saved, written with the next append (`save_committed`).
    committed: Arc<Mutex<Option<Option<LogId<NodeId>>>>>,
    size: Arc<LogSize>,
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

impl LogStore {
    fn meta<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.raft.get(key)? {
            Some(v) => decode("raft meta", &v).map(Some),
            None => Ok(None),
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SError> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Bound::Included(x.to_be_bytes()),
            Bound::Excluded(x) => Bound::Excluded(x.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self.log.range((Bound::Included(start.to_be_bytes()), end)) {
            let (_, v) = kv.map_err(|e| io_err(StorageIOError::read_logs, e))?;
            out.push(decode("log entry", &v).map_err(|e| io_err(StorageIOError::read_logs, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SError> {
        let purged: Option<LogId<NodeId>> = self
            .meta::<Option<LogId<NodeId>>>(PURGED)
            .map_err(|e| io_err(StorageIOError::read_logs, e))?
            .flatten();
        let last = match self
            .log
            .last()
            .map_err(|e| io_err(StorageIOError::read_logs, e))?
        {
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    decode("log entry", &v).map_err(|e| io_err(StorageIOError::read_logs, e))?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SError> {
        self.headroom.before_write();
        self.raft
            .insert(VOTE, encode(vote))
            .map_err(|e| io_err(StorageIOError::write_vote, e))?;
        self.flush()
            .await
            .map_err(|e| io_err(StorageIOError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SError> {
        self.meta(VOTE)
            .map_err(|e| io_err(StorageIOError::read_vote, e))
    }

    /// Kept in memory and written with the next append. Written here, the key sat in sled's
    /// buffer until the next flush anyway, but the state machine's batch right after made sled
    /// write and sync it alone (a batch rolls sled's buffer first): one sync of every commit.
    /// A commit index older than the last is allowed (openraft applies what it learns again),
    /// and the saved one was never newer than the last flush.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SError> {
        *self.committed.lock().expect("committed lock") = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SError> {
        let pending = *self.committed.lock().expect("committed lock");
        let committed = match pending {
            Some(c) => c,
            None => self
                .meta::<Option<LogId<NodeId>>>(COMMITTED)
                .map_err(|e| io_err(StorageIOError::read, e))?
                .flatten(),
        };
        // openraft saves the commit index of a snapshot it received before the state machine
        // has installed it. A crash between the two leaves a commit index past the end of this
        // log, whose entries are neither here nor in the state machine: openraft would try to
        // re-apply them at start and stop for good (found by the snapshot-install failpoint).
        // The leader tells the commit index again, so a saved one this log cannot back is
        // forgotten.
        let last = self.get_log_state().await?.last_log_id;
        if committed.map(|c| c.index) > last.map(|l| l.index) {
            tracing::warn!(
                committed = ?committed,
                last_log = ?last,
                "the saved commit index is past the end of the log (a crash while installing a snapshot); the leader will send it again"
            );
            return Ok(None);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.headroom.before_write();
        if let Some(e) = injected_write_failure() {
            return Err(io_err(StorageIOError::write_logs, e));
        }
        // Plain inserts, not a sled batch: a batch makes sled write and sync its buffer twice
        // more (it rolls the buffer before and after the batch's manifest), which was two of
        // the five syncs of a one-entry commit. Atomicity is not needed here: sled recovers a
        // prefix of its writes in order, so a crash before the flush below leaves a prefix of
        // these entries, and they were not acknowledged yet.
        let committed = self.committed.lock().expect("committed lock").take();
        if let Some(c) = committed {
            self.raft
                .insert(COMMITTED, encode(&c))
                .map_err(|e| io_err(StorageIOError::write, e))?;
        }
        for entry in entries {
            let bytes = encode(&entry);
            self.size.appended(bytes.len() as u64);
            self.log
                .insert(entry.log_id.index.to_be_bytes(), bytes)
                .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        }
        crate::failpoint::hit("log-before-flush");
        // One flush for the whole batch: only then are the entries durable.
        let res = self
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(std::io::Error::other);
        let failed = res.as_ref().err().map(|e| {
            io_err(
                StorageIOError::write_logs,
                std::io::Error::other(e.to_string()),
            )
        });
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        self.headroom.before_write();
        let mut batch = sled::Batch::default();
        for k in self.log.range(log_id.index.to_be_bytes()..).keys() {
            batch.remove(k.map_err(|e| io_err(StorageIOError::write_logs, e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        self.flush()
            .await
            .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SError> {
        self.headroom.before_write();
        self.raft
            .insert(PURGED, encode(&Some(log_id)))
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=log_id.index.to_be_bytes()).keys() {
            batch.remove(k.map_err(|e| io_err(StorageIOError::write_logs, e))?);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(StorageIOError::write_logs, e))?;
        Ok(())
    }
}

// ---- state machine ----

/// Runs `f` on a blocking thread: building or installing the snapshot of a large tree takes
/// tens of seconds (a million files: 87 MB, 2 million keys), and on a runtime thread it starved
/// the node's other tasks, its QUIC connections' keep-alives among them, until the connection
/// to the leader timed out in the middle of a join.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Invariant(format!("snapshot task failed: {e}")))?
}

/// The metadata state machine. Reads on the node go through `view()`.
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    headroom: Arc<Headroom>,
    tree: sled::Tree,
    snapshots: sled::Tree,
    /// Held while a batch is written and while a snapshot copies the tree, so a snapshot is
    /// a consistent cut.
    apply_lock: Arc<Mutex<()>>,
    hook: Arc<std::sync::OnceLock<ApplyHook>>,
    size: Arc<LogSize>,
}

/// Called after each applied batch with the proposer's session and what its commands changed.
pub type ApplyHook = Arc<dyn Fn(u64, Vec<crate::apply::Change>) + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

const SNAPSHOT: &[u8] = b"current";

impl StateMachine {
    /// The space kept on this database's disk for metadata (see `headroom`).
    pub fn headroom(&self) -> Arc<Headroom> {
        self.headroom.clone()
    }

    /// How much the log grew since the last snapshot (shared with the `LogStore`).
    pub fn log_size(&self) -> Arc<LogSize> {
        self.size.clone()
    }

    pub fn view(&self) -> StateView {
        StateView {
            tree: self.tree.clone(),
        }
    }

    fn applied(&self) -> Result<Applied, StoreError> {
        let view = self.view();
        let applied = view
            .get::<Option<LogId<NodeId>>>("applied", keys::META_APPLIED)?
            .flatten();
        let membership = view
            .get("membership", keys::META_MEMBERSHIP)?
            .unwrap_or_default();
        Ok((applied, membership))
    }

    fn apply_entries(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<Vec<MetaResponse>, StoreError> {
        let mut txn = Txn::new(&self.tree);
        let mut responses = Vec::new();
        let mut last = None;
        let mut changes = Vec::new();
        for entry in entries {
            last = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(MetaResponse::default()),
                EntryPayload::Normal(req) => {
                    ensure_root(&mut txn, req.now)?;
                    txn.take_touched();
                    responses.push(apply_request(&mut txn, &req)?);
                    // The proposer's own kernel made the change and knows it, unless the
                    // command acted on the tree itself (volumes move whole directories).
                    let by_kernel = req.cmds.iter().all(MetaCommand::goes_through_kernel);
                    let who = if by_kernel { req.session } else { 0 };
                    changes.push((who, txn.take_touched()));
                }
                EntryPayload::Membership(m) => {
                    txn.put(
                        keys::META_MEMBERSHIP,
                        &StoredMembership::new(Some(entry.log_id), m),
                    );
                    responses.push(MetaResponse::default());
                }
            }
        }
        if let Some(last) = last {
            txn.put(keys::META_APPLIED, &Some(last));
        }
        {
            let _guard = self.apply_lock.lock().expect("apply lock poisoned");
            self.tree.apply_batch(txn.into_batch())?;
        }
        if let Some(hook) = self.hook.get() {
            for (session, changes) in changes {
                if !changes.is_empty() {
                    hook(session, changes);
                }
            }
        }
        crate::failpoint::hit("apply-before-reply");
        Ok(responses)
    }

    /// Sets the function told, after each applied batch, what each proposer's commands changed.
    /// A node uses it to invalidate its kernel caches. Set it once, before Raft starts.
    pub fn set_hook(&self, hook: ApplyHook) {
        let _ = self.hook.set(hook);
    }

    fn build(&self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let (since, pairs) = {
            let _guard = self.apply_lock.lock().expect("apply lock poisoned");
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
                .tree
                .iter()
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_, _>>()?;
            (self.size.since_snapshot(), pairs)
        };
        let data = encode(&pairs);
        let field = |key: &[u8]| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_slice())
        };
        let applied: Option<LogId<NodeId>> = match field(keys::META_APPLIED) {
            Some(v) => decode("applied", v)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, openraft::BasicNode> =
            match field(keys::META_MEMBERSHIP) {
                Some(v) => decode("membership", v)?,
                None => StoredMembership::default(),
            };
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, pairs.len()),
            None => format!("empty-{}", pairs.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        crate::failpoint::hit("snapshot-build");
        self.snapshots.insert(SNAPSHOT, encode(&stored))?;
        self.size.snapshotted(data.len() as u64, since);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    fn install(
        &self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = decode("snapshot", &data)?;
        let guard = self.apply_lock.lock().expect("apply lock poisoned");
        let since = self.size.since_snapshot();
        let mut old = std::collections::BTreeMap::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            old.insert(k.to_vec(), v);
        }
        let mut batch = sled::Batch::default();
        // Every key the snapshot changes, so a node's caches drop what it replaced.
        let mut touched = Vec::new();
        for (k, v) in pairs {
            if old.remove(&k).is_none_or(|was| *was != v[..]) {
                touched.push(k.clone());
            }
            batch.insert(k, v);
        }
        for k in old.into_keys() {
            batch.remove(k.clone());
            touched.push(k);
        }
        batch.insert(keys::META_APPLIED, encode(&meta.last_log_id));
        batch.insert(keys::META_MEMBERSHIP, encode(&meta.last_membership));
        self.tree.apply_batch(batch)?;
        drop(guard);
        let entries = touched.len();
        if let Some(hook) = self.hook.get() {
            // Session 0 is nobody's: every node drops its caches of what changed.
            hook(0, crate::apply::changes_of(touched));
        }
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = data.len(),
            changed_keys = entries,
            "installed a snapshot from the leader"
        );
        crate::failpoint::hit("snapshot-install");
        let bytes = data.len() as u64;
        self.snapshots.insert(
            SNAPSHOT,
            encode(&StoredSnapshot {
                meta: meta.clone(),
                data,
            }),
        )?;
        self.db.flush()?;
        self.size.snapshotted(bytes, since);
        Ok(())
    }

    fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        Ok(match self.snapshots.get(SNAPSHOT)? {
            Some(v) => {
                let s: StoredSnapshot = decode("snapshot", &v)?;
                Some(Snapshot {
                    meta: s.meta,
                    snapshot: Box::new(Cursor::new(s.data)),
                })
            }
            None => None,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SError> {
        self.headroom.before_write();
        let sm = self.clone();
        off_runtime(move || sm.build())
            .await
            .map_err(|e| io_err(|a| StorageIOError::write_snapshot(None, a), e))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<Applied, SError> {
        self.applied()
            .map_err(|e| io_err(StorageIOError::read_state_machine, e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResponse>, SError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.headroom.before_write();
        self.apply_entries(entries)
            .map_err(|e| io_err(StorageIOError::write_state_machine, e))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SError> {
        self.headroom.before_write();
        let (sm, m) = (self.clone(), meta.clone());
        off_runtime(move || sm.install(&m, snapshot.into_inner()))
            .await
            .map_err(|e| {
                io_err(
                    |a| StorageIOError::write_snapshot(Some(meta.signature()), a),
                    e,
                )
            })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SError> {
        self.current()
            .map_err(|e| io_err(|a| StorageIOError::read_snapshot(None, a), e))
    }
}
