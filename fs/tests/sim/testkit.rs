//! `Cluster`: nodes of one test process on shoal_net's in-memory network, which a test can
//! partition, slow, make lossy or duplicating (per node pair and message kind), and whose nodes
//! it can kill and restart. The seed drives the network's faults; the test's workload draws
//! from the same seed. Time is real: openraft's timers and the threads' interleaving are not
//! under the seed, so a seed reproduces the faults and the workload, not every schedule.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use shoal_fs::NodeOptions;
use shoal_fs::node::{self, Node};
use shoal_net::memory::{MemoryNetwork, Rule};
use shoal_net::rpc::Peers;

pub const BLOCK: u32 = 1 << 20;

/// Logs of the nodes to the test's output: `RUST_LOG`, or warnings without openraft's.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error")),
        )
        .with_test_writer()
        .try_init();
}

pub struct Cluster {
    pub net: Arc<MemoryNetwork>,
    dir: tempfile::TempDir,
    /// Node k at index k - 1; `None` while killed.
    nodes: Vec<Option<Arc<Node>>>,
}

/// Node k's address on the in-memory network (never bound: nothing leaves the process).
pub fn addr(k: u64) -> SocketAddr {
    SocketAddr::from(([10, 77, 0, k as u8], 7000))
}

impl Cluster {
    /// `n` nodes: node 1 initialises the cluster, the others join it through the network.
    pub async fn new(n: u64, seed: u64) -> Cluster {
        let net = MemoryNetwork::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            net,
            dir,
            nodes: Vec::new(),
        };
        node::init(
            &c.data(1),
            BLOCK,
            Some(addr(1)),
            shoal_fs::cluster::CERT_VALIDITY,
        )
        .await
        .unwrap();
        c.nodes.push(Some(c.start(1).await));
        let token_file = shoal_fs::cluster::tls_dir(&c.data(1)).join("join-token");
        for k in 2..=n {
            let token = std::fs::read_to_string(&token_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let stranger = Peers::over(c.net.port(None));
            let config = shoal_fs::node::join::join_over(
                &c.data(k),
                token,
                addr(1),
                addr(k),
                false,
                &stranger,
            )
            .await
            .unwrap();
            assert_eq!(
                config.node_id, k,
                "nodes are numbered in the order they join"
            );
            c.nodes.push(Some(c.start(k).await));
        }
        c
    }

    pub fn data(&self, k: u64) -> PathBuf {
        self.dir.path().join(format!("node-{k}"))
    }

    async fn start(&self, k: u64) -> Arc<Node> {
        let options = NodeOptions {
            network: Some(self.net.clone()),
            ..NodeOptions::default()
        };
        Node::start(&self.data(k), options).await.unwrap()
    }

    /// Node k; panics if it is killed.
    pub fn node(&self, k: u64) -> Arc<Node> {
        self.nodes[k as usize - 1]
            .clone()
            .unwrap_or_else(|| panic!("node {k} is down"))
    }

    pub fn try_node(&self, k: u64) -> Option<Arc<Node>> {
        self.nodes[k as usize - 1].clone()
    }

    pub fn len(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// Kills node k: it leaves the network at once (nothing it sends or answers arrives), its
    /// Raft stops, and buffered writes are dropped, not committed. What it had made durable
    /// stays in its data directory.
    pub async fn kill(&mut self, k: u64) {
        let Some(node) = self.nodes[k as usize - 1].take() else {
            return;
        };
        self.net.stop(addr(k));
        let _ = node.raft.shutdown().await;
        node::release(node).await;
    }

    /// Starts node k again on its data directory.
    pub async fn restart(&mut self, k: u64) {
        assert!(self.nodes[k as usize - 1].is_none(), "node {k} is running");
        let node = self.start(k).await;
        self.nodes[k as usize - 1] = Some(node);
    }

    /// Cuts node `k` off from every other node, both ways; `heal` ends it.
    pub fn isolate(&self, k: u64) -> Vec<u64> {
        let others: Vec<u64> = (1..=self.len()).filter(|n| *n != k).collect();
        self.net.partition(&[k], &others, false)
    }

    pub fn add(&self, rule: Rule) -> u64 {
        self.net.add(rule)
    }

    pub fn heal(&self) {
        self.net.heal();
    }

    /// Stops every node gracefully (buffered writes committed).
    pub async fn shutdown(mut self) {
        for k in 1..=self.len() {
            if let Some(node) = self.nodes[k as usize - 1].take() {
                node.shutdown().await;
                self.net.stop(addr(k));
            }
        }
    }
}
