//! Elections on the in-memory network: a node cut off from the others keeps its term, so it
//! unseats no leader when it comes back (pre-vote, `node::election`), and the survivors of
//! a dead leader elect one of themselves each time.

use std::time::{Duration, Instant};

use openraft::ServerState;
use shoal_fs::node::OpError;
use shoal_fs::ops::NewEntry;
use shoal_raft::{FsError, ROOT_INO};

use crate::testkit::{Cluster, init_tracing};

/// Node k's view: its state, term and leader.
fn view(c: &Cluster, k: u64) -> (ServerState, u64, Option<u64>) {
    let m = c.node(k).raft.metrics().borrow().clone();
    (m.state, m.current_term, m.current_leader)
}

/// Waits up to `within` until the running nodes `among` agree on one leader, itself among
/// them; returns it and its term. Panics with every node's view if they do not.
async fn agreed_leader(c: &Cluster, among: &[u64], within: Duration) -> (u64, u64) {
    let deadline = Instant::now() + within;
    loop {
        let views: Vec<_> = among.iter().map(|k| view(c, *k)).collect();
        let leader = views[0].2;
        if let Some(l) = leader
            && among.contains(&l)
            && views.iter().all(|v| v.2 == leader && v.1 == views[0].1)
            && view(c, l).0 == ServerState::Leader
        {
            return (l, views[0].1);
        }
        assert!(
            Instant::now() < deadline,
            "nodes {among:?} agree on no leader after {within:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A file created through node k (forwarded to the leader): proves k can reach a leader.
async fn touch(c: &Cluster, k: u64, name: &str) {
    let node = c.node(k);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match node
            .create(ROOT_INO, name.as_bytes(), NewEntry::file(0o644))
            .await
        {
            // A retry of a create whose answer was lost.
            Ok(_) | Err(OpError::Fs(FsError::Exists)) => return,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "mkdir through node {k}: retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("mkdir {name} through node {k}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_follower_keeps_its_term_and_unseats_no_leader_when_it_returns() {
    init_tracing();
    let c = Cluster::new(3, 101).await;
    let (leader, term) = agreed_leader(&c, &[1, 2, 3], Duration::from_secs(10)).await;
    let follower = (1..=3).find(|k| *k != leader).unwrap();
    c.isolate(follower);
    // Without pre-vote the cut-off node raised its term about once a second.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (state, cut_term, _) = view(&c, follower);
    assert_eq!(
        cut_term, term,
        "node {follower} raised its term while cut off (state {state:?})"
    );
    assert_ne!(state, ServerState::Leader);
    let rest: Vec<u64> = (1..=3).filter(|k| *k != follower).collect();
    assert_eq!(
        agreed_leader(&c, &rest, Duration::from_secs(1)).await,
        (leader, term),
        "the connected nodes changed leader"
    );
    touch(&c, leader, "during").await;
    c.heal();
    touch(&c, follower, "after").await;
    assert_eq!(
        agreed_leader(&c, &[1, 2, 3], Duration::from_secs(5)).await,
        (leader, term),
        "the returning node forced an election"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_is_replaced_and_follows_the_new_one_when_it_returns() {
    init_tracing();
    let c = Cluster::new(3, 102).await;
    let (old, term) = agreed_leader(&c, &[1, 2, 3], Duration::from_secs(10)).await;
    c.isolate(old);
    let rest: Vec<u64> = (1..=3).filter(|k| *k != old).collect();
    let (new, new_term) = agreed_leader(&c, &rest, Duration::from_secs(10)).await;
    assert!(new_term > term);
    touch(&c, new, "during").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // openraft 0.9's leader does not step down by itself; what matters is that its term
    // stays, so that it cannot outvote the new leader when it returns.
    assert_eq!(view(&c, old).1, term, "the cut-off leader raised its term");
    assert_eq!(
        agreed_leader(&c, &rest, Duration::from_secs(1)).await,
        (new, new_term),
        "the connected nodes changed leader while the old one was cut off"
    );
    c.heal();
    touch(&c, old, "after").await;
    assert_eq!(
        agreed_leader(&c, &[1, 2, 3], Duration::from_secs(5)).await,
        (new, new_term),
        "the old leader's return forced an election"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_survivors_of_a_dead_leader_elect_one_of_themselves_every_time() {
    init_tracing();
    let mut c = Cluster::new(3, 103).await;
    let mut times = Vec::new();
    for round in 0..8 {
        let (dead, term) = agreed_leader(&c, &[1, 2, 3], Duration::from_secs(10)).await;
        let rest: Vec<u64> = (1..=3).filter(|k| *k != dead).collect();
        let killed = Instant::now();
        c.kill(dead).await;
        // A liveness bound, not a speed figure: 0.9's fixed timeouts could split the two
        // survivors' votes for much longer (see `node::election`).
        let (new, new_term) = agreed_leader(&c, &rest, Duration::from_secs(15)).await;
        times.push(killed.elapsed());
        assert!(
            new_term > term,
            "round {round}: term {new_term} after {term}"
        );
        touch(&c, new, &format!("round-{round}")).await;
        c.restart(dead).await;
        touch(&c, dead, &format!("back-{round}")).await;
    }
    eprintln!("elections after a leader kill took {times:?}");
    c.shutdown().await;
}
