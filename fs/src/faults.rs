//! Faults the tests inject through the environment (`SHOAL_FAULT_*`), parsed once into one
//! typed value. All are unset in production. A value that does not parse is reported once and
//! ignored, so a typo in a test shows in its log instead of silently testing nothing.
//!
//! Faults of the metadata store (`SHOAL_FAULT_LOG_WRITE_FAILS`) and the crash points
//! (`SHOAL_FAILPOINTS`) live in `shoal-raft`, which knows nothing of this crate.

use std::sync::OnceLock;
use std::time::Duration;

use tracing::warn;

/// The injected faults of this process.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// `SHOAL_FAULT_SLOW_APPEND=ID:MS`: node ID takes MS milliseconds to accept each batch of
    /// log entries, as over a slow link, so it lags the leader.
    pub slow_append: Option<(u64, Duration)>,
    /// `SHOAL_FAULT_SLOW_SNAPSHOT=ID:MS`: node ID takes MS milliseconds to accept each
    /// snapshot chunk.
    pub slow_snapshot: Option<(u64, Duration)>,
    /// `SHOAL_FAULT_DROP_PROPOSE_REPLY=1`: the leader loses its answer to the first attempt of
    /// every forwarded proposal (session renewals and disk reports aside), after applying it,
    /// as when the network drops the reply.
    pub drop_propose_reply: bool,
    /// `SHOAL_FAULT_SLOW_INVALIDATION=MS`: the invalidation thread waits MS milliseconds before
    /// each batch, as under load.
    pub slow_invalidation: Option<Duration>,
    /// `SHOAL_FAULT_SLOW_LOOKUP=MS`: each lookup answered from the view waits MS milliseconds
    /// between reading the view and replying.
    pub slow_lookup: Option<Duration>,
    /// `SHOAL_FAULT_SPILL_PAUSED=PATH`: while the file PATH exists, no node writes inline
    /// blocks out (`node::spill`), so a test can kill nodes while bytes are only in the log.
    pub spill_paused: Option<std::path::PathBuf>,
}

/// This process's faults, read from the environment at first use.
pub fn get() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| Faults::parse(|name| std::env::var(name).ok()))
}

impl Faults {
    /// Reads each variable through `var`; reports and skips those that do not parse.
    pub fn parse(var: impl Fn(&str) -> Option<String>) -> Faults {
        fn read<T>(
            var: &impl Fn(&str) -> Option<String>,
            name: &str,
            what: &str,
            parse: impl Fn(&str) -> Option<T>,
        ) -> Option<T> {
            let value = var(name)?;
            let parsed = parse(&value);
            if parsed.is_none() {
                warn!(
                    variable = name,
                    value,
                    expected = what,
                    "ignoring a fault variable that does not parse"
                );
            }
            parsed
        }
        let ms = |s: &str| s.parse().ok().map(Duration::from_millis);
        let node_ms = |s: &str| {
            let (id, delay) = s.split_once(':')?;
            Some((id.parse().ok()?, ms(delay)?))
        };
        Faults {
            slow_append: read(&var, "SHOAL_FAULT_SLOW_APPEND", "NODE:MS", node_ms),
            slow_snapshot: read(&var, "SHOAL_FAULT_SLOW_SNAPSHOT", "NODE:MS", node_ms),
            drop_propose_reply: read(&var, "SHOAL_FAULT_DROP_PROPOSE_REPLY", "1", |s| {
                (s == "1").then_some(true)
            })
            .unwrap_or(false),
            slow_invalidation: read(&var, "SHOAL_FAULT_SLOW_INVALIDATION", "MS", ms),
            slow_lookup: read(&var, "SHOAL_FAULT_SLOW_LOOKUP", "MS", ms),
            spill_paused: read(&var, "SHOAL_FAULT_SPILL_PAUSED", "PATH", |s| {
                Some(std::path::PathBuf::from(s))
            }),
        }
    }
}

/// The delay an `ID:MS` fault sets for `node`.
pub fn for_node(fault: Option<(u64, Duration)>, node: u64) -> Option<Duration> {
    fault.filter(|(id, _)| *id == node).map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(vars: &[(&str, &str)], expected: Faults) {
        let faults = Faults::parse(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(faults, expected);
    }

    #[test]
    fn nothing_set_is_no_fault() {
        check(&[], Faults::default());
    }

    #[test]
    fn each_variable_sets_its_fault() {
        check(
            &[
                ("SHOAL_FAULT_SLOW_APPEND", "3:300"),
                ("SHOAL_FAULT_SLOW_SNAPSHOT", "2:3000"),
                ("SHOAL_FAULT_DROP_PROPOSE_REPLY", "1"),
                ("SHOAL_FAULT_SLOW_INVALIDATION", "30"),
                ("SHOAL_FAULT_SLOW_LOOKUP", "700"),
                ("SHOAL_FAULT_SPILL_PAUSED", "/run/pause"),
            ],
            Faults {
                slow_append: Some((3, Duration::from_millis(300))),
                slow_snapshot: Some((2, Duration::from_secs(3))),
                drop_propose_reply: true,
                slow_invalidation: Some(Duration::from_millis(30)),
                slow_lookup: Some(Duration::from_millis(700)),
                spill_paused: Some("/run/pause".into()),
            },
        );
    }

    #[test]
    fn a_value_that_does_not_parse_sets_nothing() {
        check(
            &[
                ("SHOAL_FAULT_SLOW_APPEND", "300"),
                ("SHOAL_FAULT_SLOW_SNAPSHOT", "x:1"),
                ("SHOAL_FAULT_DROP_PROPOSE_REPLY", "yes"),
                ("SHOAL_FAULT_SLOW_LOOKUP", "1s"),
            ],
            Faults::default(),
        );
    }

    #[test]
    fn a_node_fault_applies_to_its_node_only() {
        let fault = Some((3, Duration::from_millis(20)));
        assert_eq!(for_node(fault, 3), Some(Duration::from_millis(20)));
        assert_eq!(for_node(fault, 1), None);
        assert_eq!(for_node(None, 3), None);
    }
}
