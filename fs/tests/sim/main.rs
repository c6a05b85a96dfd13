//! Many nodes at once under a faulty network: three in-process nodes on the in-memory network
//! (`testkit::Cluster`), a worker on each doing creates, writes with fsync, renames, unlinks,
//! lock-protected increments of one shared counter and Creates of the same volumes, while a
//! fault schedule drawn from the seed partitions, delays, drops, duplicates and kills. At the
//! end, against each worker's model: every acknowledged operation is there, no operation that
//! was acknowledged shows the error a second application would give, the counter lost no
//! increment (two holders of the lock at once would lose one), and every node has the same tree.
//!
//! `SHOAL_SIM_SEEDS=7,8` runs those seeds; a failure prints its seed.

mod elections;
mod testkit;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shoal_fs::node::{Node, OpError};
use shoal_fs::ops::NewEntry;
use shoal_net::memory::{Fault, Rule};
use shoal_raft::{FileKind, FsError, Ino, Kv, LockKind, ROOT_INO, RangeLock, RenameFlags};

use testkit::Cluster;

const COUNTER: &[u8] = b"counter";
/// The counter's width on disk: overwritten in place, never truncated.
const WIDTH: usize = 20;
/// How long one operation may take before it counts as lost (unknown outcome).
const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a worker knows of one of its files.
#[derive(Clone, Debug, PartialEq)]
enum Known {
    /// Acknowledged: absent (`None`) or present with these bytes.
    Sure(Option<Vec<u8>>),
    /// An operation on it failed or timed out: either outcome is allowed, and the worker
    /// leaves the name alone from then on.
    Unsure,
}

#[derive(Default)]
struct Model {
    files: BTreeMap<Vec<u8>, Known>,
    /// Increments acknowledged, and increments whose outcome is unknown.
    increments: u64,
    unsure_increments: u64,
    /// Volumes whose Create was acknowledged.
    volumes: BTreeSet<String>,
    ops: u64,
    failed: u64,
}

/// An error a second application of an acknowledged operation would give, where the model
/// says the first one cannot have happened: a bug, never a fault of the network.
fn contradicts(e: &OpError, expected: FsError) -> bool {
    matches!(e, OpError::Fs(f) if *f == expected)
}

async fn within<T>(f: impl std::future::Future<Output = Result<T, OpError>>) -> Result<T, OpError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(OpError::Raft("timed out in the test".into())),
    }
}

async fn write_file(node: &Node, name: &[u8], body: &[u8]) -> Result<Ino, OpError> {
    let f = within(node.create(ROOT_INO, name, NewEntry::file(0o644))).await?;
    within(async {
        node.open(f.ino).await?;
        let written = async {
            node.write(f.ino, 0, body)?;
            node.commit(f.ino).await
        }
        .await;
        let released = node.release(f.ino, None).await;
        written.and(released)
    })
    .await?;
    Ok(f.ino)
}

/// Takes the lock, reads the counter, writes it plus one, fsyncs, unlocks. `Ok(false)`: the
/// lock was busy, nothing done.
async fn increment(node: &Node, owner: u64) -> Result<bool, OpError> {
    let ino = within(node.lookup_linearizable(ROOT_INO, COUNTER))
        .await?
        .ino;
    within(node.open(ino)).await?;
    let lock = RangeLock {
        owner: node.lock_owner(owner),
        pid: 1,
        kind: LockKind::Write,
        start: 0,
        end: u64::MAX,
    };
    let done = async {
        match within(node.setlk(ino, lock, false, false)).await {
            Err(OpError::Fs(FsError::WouldBlock)) => return Ok(false),
            other => other?,
        }
        let counted = within(async {
            let bytes = node.read(ino, 0, WIDTH).await?;
            let n: u64 = String::from_utf8_lossy(&bytes)
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("the counter holds {bytes:?}, not a number"));
            node.write(ino, 0, format!("{:>WIDTH$}", n + 1).as_bytes())?;
            node.commit(ino).await
        })
        .await;
        let unlocked = within(node.setlk(ino, lock, true, false)).await;
        counted.and(unlocked).map(|()| true)
    }
    .await;
    let released = node.release(ino, None).await;
    done.and_then(|d| released.map(|()| d))
}

/// One worker's run on node `k`, operations drawn from `seed`, until `stop` is set.
async fn work(
    c: Arc<tokio::sync::RwLock<Cluster>>,
    k: u64,
    seed: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Model::default();
    let mut next = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(node) = c.read().await.try_node(k) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        m.ops += 1;
        let sure: Vec<Vec<u8>> = m
            .files
            .iter()
            .filter(|(_, s)| matches!(s, Known::Sure(Some(_))))
            .map(|(n, _)| n.clone())
            .collect();
        let roll = rng.random_range(0..100);
        if roll < 35 || sure.is_empty() {
            next += 1;
            let name = format!("w{k}-{next}").into_bytes();
            let len = rng.random_range(1..200_000usize);
            let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            match write_file(&node, &name, &body).await {
                Ok(_) => {
                    m.files.insert(name, Known::Sure(Some(body)));
                }
                Err(e) => {
                    assert!(
                        !contradicts(&e, FsError::Exists),
                        "node {k}: creating the new name {} failed with EEXIST",
                        String::from_utf8_lossy(&name)
                    );
                    m.failed += 1;
                    m.files.insert(name, Known::Unsure);
                }
            }
        } else if roll < 50 {
            let from = sure[rng.random_range(0..sure.len())].clone();
            next += 1;
            let to = format!("w{k}-{next}").into_bytes();
            let r =
                within(node.rename(ROOT_INO, &from, ROOT_INO, &to, RenameFlags::default())).await;
            let body = m.files.remove(&from);
            match r {
                Ok(()) => {
                    m.files.insert(from, Known::Sure(None));
                    m.files.insert(to, body.unwrap());
                }
                Err(e) => {
                    assert!(
                        !contradicts(&e, FsError::NotFound),
                        "node {k}: renaming {} (acknowledged, present) failed with ENOENT",
                        String::from_utf8_lossy(&from)
                    );
                    m.failed += 1;
                    m.files.insert(from, Known::Unsure);
                    m.files.insert(to, Known::Unsure);
                }
            }
        } else if roll < 62 {
            let name = sure[rng.random_range(0..sure.len())].clone();
            match within(node.unlink(ROOT_INO, &name)).await {
                Ok(()) => {
                    m.files.insert(name, Known::Sure(None));
                }
                Err(e) => {
                    assert!(
                        !contradicts(&e, FsError::NotFound),
                        "node {k}: unlinking {} (acknowledged, present) failed with ENOENT",
                        String::from_utf8_lossy(&name)
                    );
                    m.failed += 1;
                    m.files.insert(name, Known::Unsure);
                }
            }
        } else if roll < 92 {
            match increment(&node, k * 1000 + u64::from(next)).await {
                Ok(true) => m.increments += 1,
                Ok(false) => {}
                Err(_) => {
                    m.failed += 1;
                    m.unsure_increments += 1;
                }
            }
        } else {
            // The same few volume names from every worker at once.
            let name = format!("vol-{}", rng.random_range(0..3));
            let r = tokio::time::timeout(
                OP_TIMEOUT,
                shoal_fs::volumes::create_volume(&node, &name, &BTreeMap::new()),
            )
            .await;
            match r {
                Ok(Ok(())) => {
                    m.volumes.insert(name);
                }
                _ => m.failed += 1,
            }
        }
        drop(node);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
    }
    m
}

/// The faults of one run, drawn from the seed: each step picks a fault, holds it a while,
/// and clears it.
async fn faults(c: Arc<tokio::sync::RwLock<Cluster>>, seed: u64, steps: u32) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17);
    let mut log = Vec::new();
    let n = c.read().await.len();
    for _ in 0..steps {
        let k = rng.random_range(1..=n);
        let hold = Duration::from_millis(rng.random_range(500..9000));
        let what = rng.random_range(0..6);
        let desc;
        match what {
            0 => {
                desc = format!("isolate node {k} for {hold:?}");
                c.read().await.isolate(k);
            }
            1 => {
                desc = format!("kill node {k}, restart after {hold:?}");
                c.write().await.kill(k).await;
            }
            2 => {
                let percent = rng.random_range(5..30);
                desc = format!("lose {percent}% of all requests for {hold:?}");
                c.read().await.add(Rule {
                    from: None,
                    to: None,
                    kind: None,
                    fault: Fault::Drop { percent },
                });
            }
            3 => {
                let percent = rng.random_range(5..30);
                desc = format!("lose {percent}% of the answers to node {k} for {hold:?}");
                c.read().await.add(Rule {
                    from: Some(k),
                    to: None,
                    kind: None,
                    fault: Fault::DropReply { percent },
                });
            }
            4 => {
                let max = Duration::from_millis(rng.random_range(5..150));
                desc = format!("delay every message up to {max:?} for {hold:?}");
                c.read().await.add(Rule {
                    from: None,
                    to: None,
                    kind: None,
                    fault: Fault::Delay { max },
                });
            }
            _ => {
                let percent = rng.random_range(10..50);
                desc = format!("deliver {percent}% of the requests twice for {hold:?}");
                c.read().await.add(Rule {
                    from: None,
                    to: None,
                    kind: None,
                    fault: Fault::Duplicate { percent },
                });
            }
        }
        log.push(desc);
        tokio::time::sleep(hold).await;
        if what == 1 {
            c.write().await.restart(k).await;
        } else {
            c.read().await.heal();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
    }
    log
}

/// Every name in the root and the bytes of its file, as `node` has them after a read barrier;
/// or the error of a read or close (a commit a fault interrupted that fails again right after
/// healing, before the peers are tried again: its data stays buffered).
async fn tree(node: &Node) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, shoal_fs::node::OpError> {
    node.read_barrier().await?;
    let mut out = BTreeMap::new();
    for (ino, kind, name) in node.readdir(ROOT_INO)? {
        if kind != FileKind::File || name == b"." || name == b".." {
            continue;
        }
        let size = node.getattr(ino)?.size as usize;
        let committed = node.view.inode(ino).unwrap().map(|i| i.size);
        node.open(ino).await?;
        let bytes = node.read(ino, 0, size).await;
        let released = node.release(ino, None).await;
        let bytes = bytes?;
        released?;
        if committed != Some(bytes.len() as u64) {
            eprintln!(
                "node {}: {} (inode {ino}) reads {} bytes, its committed size is {committed:?}",
                node.id,
                String::from_utf8_lossy(&name),
                bytes.len()
            );
        }
        out.insert(name, bytes);
    }
    Ok(out)
}

async fn run(seed: u64) {
    testkit::init_tracing();
    let c = Cluster::new(3, seed).await;
    let counter = format!("{:>WIDTH$}", 0);
    testkit_write(&c.node(1), COUNTER, counter.as_bytes()).await;
    let c = Arc::new(tokio::sync::RwLock::new(c));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (1..=3u64)
        .map(|k| tokio::spawn(work(c.clone(), k, seed * 31 + k, stop.clone())))
        .collect();
    let schedule = faults(c.clone(), seed, 8).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut models = Vec::new();
    for w in workers {
        models.push(w.await.unwrap());
    }
    let c = Arc::into_inner(c)
        .expect("the workers are done")
        .into_inner();
    c.heal();
    // Every node ends with the same tree: at once, or once the commits a fault interrupted
    // land from the background (each node reads its own buffered writes until then).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let trees = loop {
        let mut trees = Vec::new();
        let mut failed = Vec::new();
        for k in 1..=3 {
            let node = c.node(k);
            match tokio::time::timeout(Duration::from_secs(60), tree(&node))
                .await
                .unwrap_or_else(|_| panic!("node {k} did not answer within 60 s after healing"))
            {
                Ok(t) => trees.push(t),
                Err(e) => failed.push(format!("node {k}: {e}")),
            }
        }
        let diff = if failed.is_empty() {
            differences(&trees)
        } else {
            failed
        };
        if diff.is_empty() {
            break trees;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after healing, the nodes still differ or fail: {diff:?}; faults: {}",
            schedule.join("; ")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let t = &trees[0];
    let mut checked = 0;
    for m in &models {
        for (name, known) in &m.files {
            let shown = String::from_utf8_lossy(name);
            match known {
                Known::Sure(None) => {
                    assert!(!t.contains_key(name), "{shown} was removed, but is there")
                }
                Known::Sure(Some(body)) => {
                    let got = t
                        .get(name)
                        .unwrap_or_else(|| panic!("{shown} was acknowledged, but is gone"));
                    assert!(
                        got == body,
                        "{shown}: {} bytes, not the {} acknowledged",
                        got.len(),
                        body.len()
                    );
                    checked += 1;
                }
                Known::Unsure => {}
            }
        }
    }
    let n: u64 = String::from_utf8_lossy(&t[COUNTER]).trim().parse().unwrap();
    let acked: u64 = models.iter().map(|m| m.increments).sum();
    let unsure: u64 = models.iter().map(|m| m.unsure_increments).sum();
    assert!(
        n >= acked && n <= acked + unsure,
        "the counter is {n}, with {acked} increments acknowledged and {unsure} unsure: \
         {} lost",
        acked.saturating_sub(n)
    );
    let node = c.node(1);
    let volumes: BTreeSet<String> = node
        .view
        .volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    for m in &models {
        for v in &m.volumes {
            assert!(
                volumes.contains(v),
                "volume {v} was created, but is not there"
            );
        }
    }
    let stats = c.net.stats();
    eprintln!(
        "seed {seed}: {} operations ({} failed under faults), {checked} acknowledged files checked \
         on 3 nodes, counter {n} ({acked} acknowledged, {unsure} unsure), volumes {volumes:?}; \
         network {stats:?}; faults: {}",
        models.iter().map(|m| m.ops).sum::<u64>(),
        models.iter().map(|m| m.failed).sum::<u64>(),
        schedule.join("; ")
    );
    drop(node);
    c.shutdown().await;
}

/// Where node 2 and node 3 differ from node 1: names, with their sizes on each.
fn differences(trees: &[BTreeMap<Vec<u8>, Vec<u8>>]) -> Vec<String> {
    let mut out = Vec::new();
    for (k, t) in trees.iter().enumerate().skip(1) {
        let names: BTreeSet<&Vec<u8>> = trees[0].keys().chain(t.keys()).collect();
        for n in names {
            if trees[0].get(n) != t.get(n) {
                let len = |t: &BTreeMap<Vec<u8>, Vec<u8>>| t.get(n).map(Vec::len);
                out.push(format!(
                    "{}: {:?} bytes on node 1, {:?} on node {}",
                    String::from_utf8_lossy(n),
                    len(&trees[0]),
                    len(t),
                    k + 1
                ));
            }
        }
    }
    out
}

async fn testkit_write(node: &Node, name: &[u8], body: &[u8]) {
    write_file(node, name, body).await.unwrap();
}

/// Prints the seed if the run panics.
struct Seed(u64);

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "FAILED with seed {0}: rerun with SHOAL_SIM_SEEDS={0}",
                self.0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_workloads_under_random_faults_keep_every_acknowledged_operation() {
    let seeds: Vec<u64> = match std::env::var("SHOAL_SIM_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("a seed"))
            .collect(),
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        let _guard = Seed(seed);
        run(seed).await;
    }
}
