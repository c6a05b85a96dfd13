//! Entry points for `cargo fuzz` (see `fuzz/`) and for the replay of its corpus in the tests:
//! each takes arbitrary bytes and must neither panic nor break an invariant it checks.

use std::sync::OnceLock;

use openraft::{Entry, EntryPayload};

use crate::TypeConfig;
use crate::apply::{Txn, apply_request, ensure_root};
use crate::types::{MetaCommand, MetaRequest, check_label, check_volume_name};
use crate::view::decode;

/// A state machine with a root and one open session, shared by every input: inputs are
/// applied to a transaction that is never committed, so each one sees the same state.
fn scratch() -> &'static sled::Tree {
    static TREE: OnceLock<sled::Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("a temporary sled database");
        let tree = db.open_tree("sm").expect("a sled tree");
        let mut txn = Txn::new(&tree);
        ensure_root(&mut txn, 1).expect("root");
        let open = MetaRequest {
            now: 1,
            session: 7,
            seq: 0,
            acked: 0,
            cmds: vec![MetaCommand::OpenSession {
                node: 1,
                session: 7,
            }],
        };
        apply_request(&mut txn, &open).expect("session");
        tree.apply_batch(txn.into_batch()).expect("batch");
        tree
    })
}

/// A log entry as the log store reads it back; a request in it is applied. The state machine
/// must answer any command, however wrong, with a result and never panic.
pub fn log_entry(bytes: &[u8]) {
    let Ok(entry) = decode::<Entry<TypeConfig>>("log entry", bytes) else {
        return;
    };
    if let EntryPayload::Normal(req) = &entry.payload {
        let mut txn = Txn::new(scratch());
        let _ = apply_request(&mut txn, req);
    }
}

/// Volume names and node labels as a user types them.
pub fn names(bytes: &[u8]) {
    let Ok(s) = std::str::from_utf8(bytes) else {
        return;
    };
    if check_volume_name(s).is_ok() {
        assert!(
            !s.is_empty() && !s.contains('/') && s != "." && s != "..",
            "{s:?}"
        );
    }
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    let _ = check_label(k, v);
}
