//! openraft's own storage conformance suite, run against the sled log store and state machine.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use shoal_raft::{LogStore, StateMachine, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = shoal_raft::open(dir.path()).expect("open sled store");
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
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _sm) = shoal_raft::open(dir.path()).unwrap();
        let id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        let entries: Vec<Entry<TypeConfig>> = (1..=177)
            .map(|i| Entry {
                log_id: id(i),
                payload: EntryPayload::Blank,
            })
            .collect();
        log.blocking_append(entries).await.unwrap();
        log.save_committed(Some(id(150))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(id(150)));
        log.save_committed(Some(id(199))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), None);
    });
}
