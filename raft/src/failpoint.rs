//! Failpoints at the durability edges, for the crash tests (`fs/tests/failpoints`).
//!
//! Compiled in only with the `failpoints` feature; without it `hit` is an empty inline
//! function and `arm` refuses. An armed failpoint does what `fail`'s actions say (`pause`,
//! `sleep(ms)`, `panic`, `off` …); `return` stops the process with SIGKILL right there, as
//! `kill -9` or a crash would, so that a test restarts the node and checks what survived.
//! Armed at start from `SHOAL_FAILPOINTS` (`name=actions;name=actions`) or at runtime through
//! the admin socket (`shoal debug failpoint NAME ACTIONS`).

/// Every failpoint: its name and the edge it sits on.
pub const ALL: &[(&str, &str)] = &[
    (
        "block-before-sync",
        "a block's bytes are written to its temp file, not yet fdatasynced",
    ),
    (
        "block-after-sync",
        "a block's temp file is fdatasynced, not yet renamed into place",
    ),
    (
        "commit-before-propose",
        "a commit's blocks are stored and on their replicas, the layout not yet proposed",
    ),
    (
        "log-before-flush",
        "Raft entries are in sled's buffers, not yet flushed to disk",
    ),
    (
        "apply-before-reply",
        "entries are applied to the state machine, the proposer not yet answered",
    ),
    (
        "snapshot-build",
        "a snapshot is built from the state machine, not yet stored",
    ),
    (
        "snapshot-install",
        "a received snapshot replaced the state machine, not yet stored as the current snapshot",
    ),
    (
        "repair-before-store",
        "repair fetched a missing copy from another node, not yet stored it",
    ),
    (
        "spill-before-propose",
        "the leader wrote inline blocks out as block files, not yet told the state machine",
    ),
    (
        "gc-before-delete",
        "the collector chose a garbage block, not yet deleted its file",
    ),
    (
        "gc-before-forget",
        "the collector deleted garbage blocks, not yet told the state machine",
    ),
    (
        "fuse-mkdir",
        "a mkdir request is in the daemon, its directory locked by the kernel",
    ),
];

/// Runs failpoint `name`'s actions, if it is armed.
#[inline]
pub fn hit(name: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        debug_assert!(
            ALL.iter().any(|(n, _)| *n == name),
            "unlisted failpoint {name}"
        );
        fail::fail_point!(name, |_| crash(name));
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
fn crash(name: &str) {
    tracing::error!(failpoint = name, "failpoint reached: stopping with SIGKILL");
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // SIGKILL is delivered before kill(2) returns to a single-threaded caller; other threads
    // may run a moment longer, this one does nothing more.
    loop {
        std::thread::park();
    }
}

/// Why a failpoint could not be armed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailpointError {
    #[error("no failpoint {name:?}; there are: {known}")]
    Unknown { name: String, known: String },
    /// `fail` refused the actions.
    #[error("failpoint {name}: {why}")]
    Actions { name: String, why: String },
    #[error("this shoal was built without failpoints: build it with `--features failpoints`")]
    NotBuilt,
    #[error("SHOAL_FAILPOINTS: {0:?} is not name=actions (e.g. log-before-flush=return)")]
    Spec(String),
}

/// Arms failpoint `name` with `actions` (`fail`'s syntax: `return`, `pause`, `off`,
/// `2*off->return` …).
pub fn arm(name: &str, actions: &str) -> Result<(), FailpointError> {
    if !ALL.iter().any(|(n, _)| *n == name) {
        let names: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
        return Err(FailpointError::Unknown {
            name: name.to_string(),
            known: names.join(", "),
        });
    }
    #[cfg(feature = "failpoints")]
    {
        fail::cfg(name, actions).map_err(|why| FailpointError::Actions {
            name: name.to_string(),
            why,
        })
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = actions;
        Err(FailpointError::NotBuilt)
    }
}

/// Arms the failpoints `SHOAL_FAILPOINTS` names (`name=actions;name=actions`), if it is set.
pub fn arm_from_env() -> Result<(), FailpointError> {
    let Ok(spec) = std::env::var("SHOAL_FAILPOINTS") else {
        return Ok(());
    };
    for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| FailpointError::Spec(part.to_string()))?;
        arm(name.trim(), actions.trim())?;
    }
    Ok(())
}
