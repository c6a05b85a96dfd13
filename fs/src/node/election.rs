//! When a node starts an election: after a pre-vote a majority of voters granted.
//!
//! openraft 0.9 has no pre-vote. A follower that stops hearing from its leader raises its term
//! and asks for votes, every election timeout, whether or not anyone can hear it: a node cut
//! off by a partition raised its term from 66 to 194 in 50 s, and when the partition healed,
//! its higher term made the working leader step down for an election nobody needed. 0.9 also
//! draws each node's election timeout once, when it starts, so two survivors whose draws are
//! close can split their votes round after round.
//!
//! So on the nodes of a cluster openraft's own election timer is off (`enable_elect: false`)
//! and [`worker`] decides:
//! - A voter that has heard from no leader for the leader lease plus a timeout drawn anew for
//!   each attempt asks every other voter for a pre-vote ([`Request::PreVote`]).
//! - A voter grants it ([`answer`]) when it too has heard from no leader within the lease (a
//!   leader: when no quorum acknowledged it within the lease) and the candidate's log is at
//!   least as up to date as its own. A pre-vote changes nothing on either side.
//! - With a majority, itself included, the worker has openraft start the election; without,
//!   it waits another drawn timeout and asks again. Its term stays where it was, so a node
//!   that comes back from a partition finds the cluster's leader and follows it.
//!
//! A cluster of one voter elects itself at once, as openraft would.

use std::sync::Weak;
use std::time::Duration;

use openraft::{LogId, ServerState};
use rand::Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info};

use super::Node;
use crate::cluster::rpc::{PreVote, Request, Response};

/// openraft's election timeout bounds (milliseconds): see `node::raft_config`.
pub const ELECTION_TIMEOUT_MIN: u64 = 300;
pub const ELECTION_TIMEOUT_MAX: u64 = 600;
/// How long a node that heard from a leader trusts it is alive: openraft 0.9 takes the
/// maximum election timeout, and refuses votes within it; a pre-vote does the same.
const LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MAX);
/// How often the worker looks at its node's Raft state.
const TICK: Duration = Duration::from_millis(50);

/// What this node's Raft says about leaders it heard from, read in one step.
struct Seen {
    state: ServerState,
    /// The node's vote names a leader a quorum elected.
    committed: bool,
    /// Since this node last heard from its leader, or granted a vote.
    quiet: Option<Duration>,
    last_log: Option<LogId<u64>>,
    term: u64,
}

async fn seen(node: &Node) -> Option<Seen> {
    let mut seen = node
        .raft
        .with_raft_state(|st| {
            let vote = st.vote_ref();
            Seen {
                state: st.server_state,
                committed: vote.is_committed(),
                quiet: st
                    .vote_last_modified()
                    .map(|t| Instant::now().saturating_duration_since(t)),
                last_log: None,
                term: vote.leader_id().term,
            }
        })
        .await
        .ok()?;
    // openraft keeps the last log id to itself; its metrics publish it after each change.
    seen.last_log = node.raft.data_metrics().borrow().last_log;
    Some(seen)
}

/// A random election timeout, drawn for each attempt.
fn draw() -> Duration {
    Duration::from_millis(rand::rng().random_range(ELECTION_TIMEOUT_MIN..=ELECTION_TIMEOUT_MAX))
}

/// Whether `node` would vote for a candidate with `req` now (see the module docs).
pub async fn answer(node: &Node, peer: u64, req: PreVote) -> bool {
    let Some(me) = seen(node).await else {
        return false;
    };
    let leader_alive = match me.state {
        ServerState::Leader => node
            .raft
            .metrics()
            .borrow()
            .millis_since_quorum_ack
            .is_some_and(|ms| Duration::from_millis(ms) <= LEASE),
        _ => me.committed && me.quiet.is_some_and(|q| q <= LEASE),
    };
    let granted = !leader_alive && req.last_log >= me.last_log;
    debug!(
        peer,
        term = req.term,
        my_term = me.term,
        leader_alive,
        granted,
        "pre-vote asked"
    );
    granted
}

/// Starts elections for `node` (see the module docs) until the node is gone.
pub async fn worker(node: Weak<Node>) {
    let started = Instant::now();
    // When the last attempt was made, and the timeout drawn for the next one.
    let mut last_attempt: Option<Instant> = None;
    let mut timeout = draw();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(node) = node.upgrade() else { return };
        let Some(me) = seen(&node).await else {
            return; // Raft stopped.
        };
        let membership = node.raft.metrics().borrow().membership_config.clone();
        let voters: Vec<u64> = membership.membership().voter_ids().collect();
        if me.state == ServerState::Leader || !voters.contains(&node.id) {
            last_attempt = None;
            continue;
        }
        let now = Instant::now();
        let heard = me.quiet.map(|q| now - q).unwrap_or(started);
        let since = last_attempt.map_or(heard, |a| a.max(heard));
        let wait = if me.committed && last_attempt.is_none_or(|a| a < heard) {
            LEASE + timeout
        } else {
            timeout
        };
        if voters.len() > 1 && now.saturating_duration_since(since) < wait {
            continue;
        }
        if voters.len() == 1 && me.state == ServerState::Candidate && now - since < wait {
            continue;
        }
        last_attempt = Some(now);
        timeout = draw();
        let others: Vec<u64> = voters.iter().copied().filter(|v| *v != node.id).collect();
        let req = PreVote {
            term: me.term + 1,
            last_log: me.last_log,
        };
        let granted = ask(&node, &others, &req).await;
        let quorum = voters.len() / 2 + 1;
        if granted + 1 >= quorum {
            info!(
                term = req.term,
                granted = granted + 1,
                voters = voters.len(),
                "pre-vote won: starting an election"
            );
            if node.raft.trigger().elect().await.is_err() {
                return;
            }
        } else {
            debug!(
                granted = granted + 1,
                voters = voters.len(),
                "pre-vote lost: no election"
            );
        }
    }
}

/// Asks `others` for a pre-vote at once; returns how many granted. Stops waiting when enough
/// did for a majority with this node, or when every answer is in.
async fn ask(node: &Node, others: &[u64], req: &PreVote) -> usize {
    let Some(cluster) = node.cluster() else {
        return 0;
    };
    // A majority of the voters, this node aside.
    let needed = others.len().div_ceil(2);
    let mut calls = JoinSet::new();
    for (id, addr) in node.other_members() {
        if !others.contains(&id) {
            continue;
        }
        let Ok(addr) = addr else { continue };
        let peers = cluster.peers.clone();
        let req = Request::PreVote(req.clone());
        calls.spawn(
            async move {
                match peers.call::<_, Response>(addr, &req).await {
                    Ok(Response::PreVote(granted)) => granted,
                    Ok(other) => {
                        debug!(peer = id, ?other, "pre-vote refused");
                        false
                    }
                    Err(e) => {
                        debug!(peer = id, error = %e, "pre-vote not answered");
                        false
                    }
                }
            }
            .in_current_span(),
        );
    }
    let mut granted = 0;
    while let Some(answer) = calls.join_next().await {
        if answer.unwrap_or(false) {
            granted += 1;
            if granted >= needed {
                break;
            }
        }
    }
    granted
}
