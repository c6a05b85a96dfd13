//! openraft's own storage conformance suite, run against the sled log store and state machine.

use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, StorageError};
use shoal_raft::{LogStore, StateMachine, TypeConfig};

/// Opens the store in `dir/meta`: the store keeps its headroom file beside the database
/// (`meta.headroom`), which must be inside the temporary directory to go with it (each run of
/// the suite left 64 MiB files in /tmp, gigabytes of them).
fn open(dir: &tempfile::TempDir) -> Result<(LogStore, StateMachine), shoal_raft::StoreError> {
    shoal_raft::open(&dir.path().join("meta"))
}

/// Runs `f` on a current-thread runtime.
fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn blank(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: id(index),
        payload: EntryPayload::Blank,
    }
}

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open(&dir).expect("open sled store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_sled() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}

/// A crash while a follower installs a snapshot can leave the commit index of the snapshot
/// saved, and neither the snapshot nor the entries before it: the store must not claim a commit
/// index its log cannot back, or openraft stops at start re-applying entries it cannot find.
#[test]
fn a_saved_commit_index_past_the_end_of_the_log_is_not_claimed() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _sm) = open(&dir).unwrap();
        log.blocking_append((1..=177).map(blank)).await.unwrap();
        log.save_committed(Some(id(150))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(id(150)));
        log.save_committed(Some(id(199))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
    });
}

/// A crash while installing a snapshot: the log was purged up to the snapshot, the state
/// machine still holds what it had before. Reopened, the log goes back to what was applied,
/// so openraft does not look for entries that are nowhere, and the leader's snapshot comes
/// again.
#[test]
fn a_log_purged_past_the_state_machine_goes_back_to_it_at_open() {
    use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
    run(async {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, mut sm) = open(&dir).unwrap();
            log.blocking_append((1..=100).map(blank)).await.unwrap();
            sm.apply((1..=100).map(blank)).await.unwrap();
            // What the snapshot install got to before the crash: the log's part only.
            log.purge(id(150)).await.unwrap();
            log.save_committed(Some(id(150))).await.unwrap();
            assert_eq!(
                log.get_log_state().await.unwrap().last_purged_log_id,
                Some(id(150))
            );
        }
        let (mut log, mut sm) = open(&dir).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(id(100)));
        assert_eq!(state.last_log_id, Some(id(100)));
        // The commit index is written with the next append (none came here): never past
        // what the log and the state machine hold.
        let committed = log.read_committed().await.unwrap();
        assert!(committed.map(|c| c.index) <= Some(100), "{committed:?}");
        assert_eq!(sm.applied_state().await.unwrap().0, Some(id(100)));
        assert!(log.try_get_log_entries(101..=150).await.unwrap().is_empty());
    });
}

/// The commit index openraft saves is written with the next append, in the same flush: after
/// a reopen it is the last one saved before that append.
#[test]
fn the_commit_index_is_written_with_the_next_append() {
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
    run(async {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _sm) = open(&dir).unwrap();
            log.blocking_append((1..=10).map(blank)).await.unwrap();
            log.save_committed(Some(id(8))).await.unwrap();
            assert_eq!(log.read_committed().await.unwrap(), Some(id(8)));
            log.blocking_append((11..=12).map(blank)).await.unwrap();
            // Saved after the last append: gone with a crash, which openraft allows.
            log.save_committed(Some(id(11))).await.unwrap();
        }
        let (mut log, _sm) = open(&dir).unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(id(8)));
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(id(12)));
    });
}

/// The store counts the log's bytes since the last snapshot (also across a reopen), a snapshot
/// takes what it covers off the count, and the purge point by bytes keeps at most the bytes
/// asked for behind the snapshot.
#[test]
fn the_log_counts_its_bytes_since_the_snapshot_and_where_to_purge_them() {
    use openraft::RaftSnapshotBuilder;
    use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let one = {
            let (mut log, mut sm) = open(&dir).unwrap();
            let size = sm.log_size();
            assert_eq!(size.since_snapshot(), 0);
            log.blocking_append((1..=100).map(blank)).await.unwrap();
            let bytes = size.since_snapshot();
            assert!(bytes > 0 && bytes % 100 == 0, "{bytes}");
            let one = bytes / 100;
            assert!(!size.wants_snapshot(), "far below the byte limit");
            // Behind a snapshot at 100, ten entries' bytes: entries 91..=100 stay.
            assert_eq!(size.purge_point(100, 10 * one).unwrap(), Some(90));
            assert_eq!(size.purge_point(100, 10 * one + 1).unwrap(), Some(90));
            assert_eq!(size.purge_point(50, 10 * one).unwrap(), Some(40));
            assert_eq!(size.purge_point(100, 100 * one).unwrap(), None);
            log.purge(id(90)).await.unwrap();
            assert_eq!(
                size.purge_point(100, 10 * one).unwrap(),
                None,
                "purged already"
            );
            sm.apply((1..=100).map(blank)).await.unwrap();
            one
        };
        let (mut log, mut sm) = open(&dir).unwrap();
        let size = sm.log_size();
        assert_eq!(
            size.since_snapshot(),
            10 * one,
            "what the log holds counts at open"
        );
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(id(100)));
        assert_eq!(size.since_snapshot(), 0);
        assert!(size.snapshot_bytes() > 0);
        assert_eq!(
            size.keep_bytes(),
            shoal_raft::LogSize::MIN_BYTES,
            "a small state keeps the minimum"
        );
        log.blocking_append((101..=105).map(blank)).await.unwrap();
        assert_eq!(size.since_snapshot(), 5 * one);
        // Reopened: the snapshot's size is known again.
        let bytes = size.snapshot_bytes();
        drop((log, sm, size));
        let (_log, sm) = open(&dir).unwrap();
        assert!(sm.log_size().snapshot_bytes() >= bytes);
    });
}
