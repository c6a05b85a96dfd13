//! An in-memory network for deterministic multi-node tests.
//!
//! Nodes of one test process serve on it under their cluster addresses, and call each other
//! through a `MemoryPort`, the `Transport` that stands in for QUIC. A call carries the same
//! postcard frames as QUIC does, and the server learns the caller's node id from the network,
//! as it would from the caller's certificate.
//!
//! Faults are rules, each for a direction between two nodes (or any) and a message kind (the
//! request's variant index, or any): a request lost (a partition is a rule that loses all of
//! them, one way or both), an answer lost after the request was handled, a random delay (which
//! also reorders messages), a request delivered twice. Whether a rule fires is drawn from one
//! seeded generator, so a seed gives the same faults for the same sequence of calls. A lost
//! message never answers: the caller's timeout ends the call, as on a real network. A node not
//! serving (killed) does not answer either.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::rpc::{BoxFuture, RpcError, Transport};

/// A server's request handler: the caller's node id (`None` for a stranger) and the request
/// frame in, the response frame out.
pub type Handler = Arc<dyn Fn(Option<u64>, Vec<u8>) -> BoxFuture<'static, Vec<u8>> + Send + Sync>;

/// What a rule does to the messages it matches.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The request is lost, in `percent` of the calls (100: a partition).
    Drop { percent: u8 },
    /// The request is handled but its answer is lost, in `percent` of the calls.
    DropReply { percent: u8 },
    /// The request and the answer each wait a random time up to `max`.
    Delay { max: Duration },
    /// The request is delivered twice, in `percent` of the calls; the caller gets one answer.
    Duplicate { percent: u8 },
}

/// Which messages a rule applies to: `None` matches any.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub kind: Option<u32>,
    pub fault: Fault,
}

impl Rule {
    fn matches(&self, from: Option<u64>, to: u64, kind: Option<u32>) -> bool {
        (self.from.is_none() || self.from == from)
            && self.to.is_none_or(|t| t == to)
            && (self.kind.is_none() || self.kind == kind)
    }
}

/// Counts of what the network did, for tests to show their faults happened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub delivered: u64,
    pub dropped: u64,
    pub replies_dropped: u64,
    pub delayed: u64,
    pub duplicated: u64,
}

struct Server {
    node: u64,
    handler: Handler,
    /// Changes with each `serve` at the address: a reply from a server since replaced is lost.
    generation: u64,
}

struct State {
    servers: HashMap<SocketAddr, Server>,
    rules: Vec<(u64, Rule)>,
    next: u64,
    rng: rand::rngs::StdRng,
    stats: Stats,
}

/// The network: servers by address, the fault rules and the seeded generator.
pub struct MemoryNetwork {
    state: Mutex<State>,
}

/// What one call will go through, drawn when it starts.
struct Plan {
    drop: bool,
    drop_reply: bool,
    duplicate: bool,
    delay: (Duration, Duration),
}

impl MemoryNetwork {
    pub fn new(seed: u64) -> Arc<MemoryNetwork> {
        Arc::new(MemoryNetwork {
            state: Mutex::new(State {
                servers: HashMap::new(),
                rules: Vec::new(),
                next: 1,
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                stats: Stats::default(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("memory network lock")
    }

    /// Serves `node`'s requests at `addr`, replacing whatever served there.
    pub fn serve(&self, addr: SocketAddr, node: u64, handler: Handler) {
        let mut s = self.state();
        let generation = s.next;
        s.next += 1;
        s.servers.insert(
            addr,
            Server {
                node,
                handler,
                generation,
            },
        );
    }

    /// Stops serving at `addr` (the node was killed): calls to it and answers from it are lost.
    pub fn stop(&self, addr: SocketAddr) {
        self.state().servers.remove(&addr);
    }

    /// The transport a node calls through; `node` is who the servers see calling.
    pub fn port(self: &Arc<Self>, node: Option<u64>) -> Arc<MemoryPort> {
        Arc::new(MemoryPort {
            net: self.clone(),
            from: node,
        })
    }

    /// Adds a rule; returns its id, for `remove`.
    pub fn add(&self, rule: Rule) -> u64 {
        let mut s = self.state();
        let id = s.next;
        s.next += 1;
        s.rules.push((id, rule));
        id
    }

    pub fn remove(&self, id: u64) {
        self.state().rules.retain(|(r, _)| *r != id);
    }

    /// Removes every rule: the network heals.
    pub fn heal(&self) {
        self.state().rules.clear();
    }

    /// Cuts every message from a node in `a` to a node in `b`, and back unless `one_way`.
    pub fn partition(&self, a: &[u64], b: &[u64], one_way: bool) -> Vec<u64> {
        let mut ids = Vec::new();
        for &x in a {
            for &y in b {
                let mut cut = |from, to| {
                    ids.push(self.add(Rule {
                        from: Some(from),
                        to: Some(to),
                        kind: None,
                        fault: Fault::Drop { percent: 100 },
                    }))
                };
                cut(x, y);
                if !one_way {
                    cut(y, x);
                }
            }
        }
        ids
    }

    pub fn stats(&self) -> Stats {
        self.state().stats
    }

    /// Draws what a call from `from` to `to` of `kind` goes through.
    fn plan(&self, from: Option<u64>, to: u64, kind: Option<u32>) -> Plan {
        let mut s = self.state();
        let mut plan = Plan {
            drop: false,
            drop_reply: false,
            duplicate: false,
            delay: (Duration::ZERO, Duration::ZERO),
        };
        let rules: Vec<Rule> = s
            .rules
            .iter()
            .filter(|(_, r)| r.matches(from, to, kind))
            .map(|(_, r)| *r)
            .collect();
        for r in rules {
            let roll = s.rng.random_range(0..100u8);
            match r.fault {
                Fault::Drop { percent } => plan.drop |= roll < percent,
                Fault::DropReply { percent } => plan.drop_reply |= roll < percent,
                Fault::Duplicate { percent } => plan.duplicate |= roll < percent,
                Fault::Delay { max } => {
                    let max = max.as_micros() as u64;
                    let there = Duration::from_micros(s.rng.random_range(0..=max));
                    let back = Duration::from_micros(s.rng.random_range(0..=max));
                    plan.delay = (plan.delay.0 + there, plan.delay.1 + back);
                }
            }
        }
        let st = &mut s.stats;
        if plan.drop {
            st.dropped += 1;
        } else {
            st.delivered += 1;
            st.replies_dropped += u64::from(plan.drop_reply);
            st.duplicated += u64::from(plan.duplicate);
            st.delayed += u64::from(plan.delay != (Duration::ZERO, Duration::ZERO));
        }
        plan
    }

    fn server(&self, addr: SocketAddr) -> Option<(u64, Handler, u64)> {
        let s = self.state();
        let server = s.servers.get(&addr)?;
        Some((server.node, server.handler.clone(), server.generation))
    }

    fn serving(&self, addr: SocketAddr, generation: u64) -> bool {
        self.state()
            .servers
            .get(&addr)
            .is_some_and(|s| s.generation == generation)
    }
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// One node's side of the network: the `Transport` it calls through.
pub struct MemoryPort {
    net: Arc<MemoryNetwork>,
    from: Option<u64>,
}

impl Transport for MemoryPort {
    fn call(&self, addr: SocketAddr, req: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, RpcError>> {
        Box::pin(async move {
            let lost = std::future::pending::<Result<Vec<u8>, RpcError>>;
            let Some((to, handler, generation)) = self.net.server(addr) else {
                return lost().await;
            };
            let kind = postcard::take_from_bytes::<u32>(&req).ok().map(|(k, _)| k);
            let plan = self.net.plan(self.from, to, kind);
            if plan.drop {
                return lost().await;
            }
            tokio::time::sleep(plan.delay.0).await;
            if plan.duplicate {
                tokio::spawn(handler(self.from, req.clone()));
            }
            let answer = handler(self.from, req).await;
            tokio::time::sleep(plan.delay.1).await;
            if plan.drop_reply || !self.net.serving(addr, generation) {
                return lost().await;
            }
            Ok(answer)
        })
    }

    fn reset(&self, _addr: SocketAddr) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn forget(&self, _addr: SocketAddr) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn forget_all(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
