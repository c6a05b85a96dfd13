//! The Prometheus endpoint (`--metrics`): its values move with what the nodes do, on every
//! node at once, and they tell an operator about a node that died and came back.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::time::Duration;

use crate::cluster::{LocalCluster, eventually_within};

type Scrape = BTreeMap<String, f64>;

fn get(m: &Scrape, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn scrape(c: &LocalCluster, k: u32) -> Scrape {
    c.scrape(k)
        .unwrap_or_else(|e| panic!("node {k}'s metrics: {e}"))
}

/// Writes `len` bytes of `seed` to `path` and fsyncs them.
fn write_fsynced(path: &std::path::Path, seed: u8, len: usize) {
    let mut f = fs::File::create(path).unwrap();
    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn metrics_move_on_every_node_while_three_write_at_once_and_tell_of_a_node_that_came_back() {
    const MIB: usize = 1 << 20;
    let c = LocalCluster::up_with_metrics(3);
    let before: Vec<Scrape> = (1..=3).map(|k| scrape(&c, k)).collect();

    // Three hosts write and fsync a file each at the same moment, then read the others'.
    std::thread::scope(|s| {
        for k in 1..=3u32 {
            let c = &c;
            s.spawn(move || write_fsynced(&c.mnt(k).join(format!("from-{k}")), k as u8, 4 * MIB));
        }
    });
    for k in 1..=3u32 {
        for other in (1..=3u32).filter(|o| *o != k) {
            let got = fs::read(c.mnt(k).join(format!("from-{other}"))).unwrap();
            assert_eq!(got.len(), 4 * MIB, "node {k} reads node {other}'s file");
        }
    }

    let after: Vec<Scrape> = (1..=3).map(|k| scrape(&c, k)).collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let k = i + 1;
        let moved = |key: &str| get(a, key) - get(b, key);
        assert!(
            moved(r#"shoal_fuse_ops_total{op="write"}"#) >= 1.0,
            "node {k}: writes counted"
        );
        assert!(
            moved(r#"shoal_fuse_ops_total{op="fsync"}"#) >= 1.0,
            "node {k}: fsyncs counted"
        );
        assert!(
            moved(r#"shoal_fuse_op_seconds_count{op="fsync"}"#) >= 1.0
                && moved(r#"shoal_fuse_op_seconds_sum{op="fsync"}"#) > 0.0,
            "node {k}: fsync latency observed"
        );
        assert!(
            moved("shoal_commit_seconds_count") >= 1.0,
            "node {k}: commits timed"
        );
        // R = 3 on three nodes: each node's 4 MiB went to both others, and it took theirs.
        assert!(
            moved(r#"shoal_replicated_bytes_total{direction="out"}"#) >= (8 * MIB) as f64,
            "node {k}: bytes replicated out: {}",
            moved(r#"shoal_replicated_bytes_total{direction="out"}"#)
        );
        assert!(
            moved(r#"shoal_replicated_bytes_total{direction="in"}"#) >= (8 * MIB) as f64,
            "node {k}: bytes replicated in: {}",
            moved(r#"shoal_replicated_bytes_total{direction="in"}"#)
        );
        assert!(
            moved("shoal_raft_applied_index") >= 3.0,
            "node {k}: Raft applied"
        );
        assert!(
            get(a, "shoal_blocks_stored") >= 3.0,
            "node {k}: holds the three files' blocks"
        );
        assert!(
            get(a, "shoal_session_lease_age_seconds") < 5.0,
            "node {k}: lease renewed within the lease"
        );
        let proposals = moved(r#"shoal_proposals_total{path="local"}"#)
            + moved(r#"shoal_proposals_total{path="forwarded"}"#);
        assert!(proposals >= 1.0, "node {k}: proposals counted");
    }
    // A volume with a quota, written on one node: every node reports its use.
    let out = c.shoal_at(1, &["volume", "create", "vm", "-o", "size=64MiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_fsynced(&c.mnt(2).join("volumes/vm/data"), 7, 3 * MIB);
    for k in 1..=3u32 {
        eventually_within(
            "every node reports the volume's use",
            Duration::from_secs(10),
            || {
                c.scrape(k).is_ok_and(|m| {
                    get(&m, r#"shoal_volume_quota_bytes{volume="vm"}"#) == (64 * MIB) as f64
                        && get(&m, r#"shoal_volume_bytes{volume="vm"}"#) == (3 * MIB) as f64
                        && get(&m, r#"shoal_volume_inodes{volume="vm"}"#) == 2.0
                })
            },
        );
    }

    let leaders: Vec<f64> = after.iter().map(|m| get(m, "shoal_raft_leader")).collect();
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && *l > 0.0),
        "every node names one leader: {leaders:?}"
    );
    let leading: f64 = after.iter().map(|m| get(m, "shoal_raft_is_leader")).sum();
    assert_eq!(leading, 1.0, "exactly one node says it leads");

    // A follower dies; the others go on writing, and their endpoints go on answering.
    let leader = leaders[0] as u32;
    let victim = (1..=3u32).find(|k| *k != leader).unwrap();
    let writer = (1..=3u32).find(|k| *k != victim).unwrap();
    c.kill9(victim);
    assert!(
        c.scrape(victim).is_err(),
        "a dead node's endpoint does not answer"
    );
    for n in 0..4u8 {
        write_fsynced(&c.mnt(writer).join(format!("while-down-{n}")), n, MIB);
    }
    for k in (1..=3u32).filter(|k| *k != victim) {
        let m = scrape(&c, k);
        assert!(
            get(&m, "shoal_raft_leader") == leader as f64,
            "node {k} still names the leader"
        );
    }

    // Back: it repairs the blocks written while it was down, and the metrics say so. (A
    // loaded machine may have elected another leader meanwhile: it names the one the writer
    // names.)
    c.local_up(3);
    let mut last = String::new();
    eventually_within(
        "the restarted node fetched what it missed and says so",
        Duration::from_secs(60),
        || {
            let now = c.scrape(writer).map(|m| get(&m, "shoal_raft_leader"));
            let seen = c.scrape(victim).map(|m| {
                [
                    "shoal_blocks_repaired_total",
                    "shoal_blocks_missing",
                    "shoal_raft_leader",
                ]
                .map(|k| get(&m, k))
            });
            // Shown if it never happens.
            let said = format!(
                "node {victim}: repaired, missing, leader: {seen:?}; the writer's leader: {now:?}"
            );
            if said != last {
                eprintln!("{said}");
                last = said;
            }
            seen.is_ok_and(|[repaired, missing, named]| {
                repaired >= 4.0 && missing == 0.0 && named > 0.0 && now.is_ok_and(|l| named == l)
            })
        },
    );
    let m = scrape(&c, victim);
    assert!(
        get(&m, "shoal_blocks_stored") >= 8.0,
        "the restarted node holds every file's blocks: {}",
        get(&m, "shoal_blocks_stored")
    );
}

/// `shoal status --watch` redraws the node's status with the rates of what it does, and the
/// members, while two nodes write at once; one of them killed shows as down.
#[test]
fn status_watch_shows_rates_and_members_while_nodes_write() {
    let c = LocalCluster::up(3);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        for k in [1u32, 2] {
            let (c, stop) = (&c, &stop);
            s.spawn(move || {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    write_fsynced(&c.mnt(k).join(format!("w{k}-{n}")), n as u8, 64 << 10);
                    n += 1;
                }
            });
        }
        let child = std::process::Command::new(crate::testkit::shoal())
            .args(["status", "--watch", "0.3", "--data"])
            .arg(c.data(1))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        c.kill9(3);
        std::thread::sleep(Duration::from_secs(7));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        child.wait_with_output().unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let frames: Vec<&str> = text
        .split("\x1b[2J\x1b[H")
        .filter(|f| !f.is_empty())
        .collect();
    assert!(
        frames.len() >= 5,
        "redrawn every 0.3 s: {} frames",
        frames.len()
    );
    // Node 1 writes and fsyncs: some frame shows its requests and fsyncs per second.
    let busy = frames.iter().any(|f| {
        f.lines().any(|l| {
            l.starts_with("rates ") && !l.contains(" 0 FUSE req/s") && !l.contains(" 0 fsyncs")
        })
    });
    assert!(
        busy,
        "a frame shows node 1's requests and fsyncs per second:\n{text}"
    );
    assert!(
        frames.iter().any(|f| f
            .lines()
            .any(|l| l.starts_with("replication ") && !l.contains(" 0 B/s out"))),
        "a frame shows node 1's copies going out:\n{text}"
    );
    let last = frames.last().unwrap();
    assert!(last.contains("ADDRESS"), "the members' table: {last}");
    let node3 = last
        .lines()
        .find(|l| l.starts_with("3 "))
        .unwrap_or_else(|| panic!("node 3 in the table: {last}"));
    assert!(
        node3.contains("down"),
        "node 3, killed, shows down once its lease ends: {node3}"
    );
}
