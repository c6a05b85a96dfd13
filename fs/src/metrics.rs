//! The node's Prometheus metrics (crate `prometheus-client`), served in the OpenMetrics text
//! format on `GET /metrics` when the daemon gets `--metrics ADDR`. Every name starts with
//! `shoal_`.
//!
//! Two kinds: what happens is counted where it happens, in `Metrics` (FUSE operations and
//! their latency, commits, proposals, bytes replicated, cache hits); what the node *is* (Raft
//! state, blocks, repair queue, volume use, session lease) is read from the node when scraped
//! (`NodeState`), so a scrape shows the present, not the last time someone updated a gauge.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shoal_raft::Kv;

use crate::node::Node;

/// Latency buckets: 50 µs to about 13 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 19))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `out`: copies this node sent; `in`: copies it took from others.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// `local`: proposed on this node, the leader; `forwarded`: sent to the leader.
    pub path: &'static str,
}

/// What the node counts as it works. Cheap to update: atomics behind `Arc`s.
#[derive(Debug)]
pub struct Metrics {
    fuse_ops: Family<OpLabel, Counter>,
    /// Every FUSE request answered, whatever its operation (for `shoal status --watch`).
    fuse_total: Counter,
    fuse_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// Time of one commit of an open file's buffered writes: blocks written, replicated and
    /// the layout proposed.
    commit_seconds: Histogram,
    /// Commits timed, for `shoal status --watch` (the histogram keeps its count to itself).
    commits: Counter,
    proposals: Family<PathLabel, Counter>,
    replicated_bytes: Family<DirectionLabel, Counter>,
    /// Inline blocks this node wrote out as block files, and their bytes.
    spilled_blocks: Counter,
    spilled_bytes: Counter,
    /// FUSE requests taken and not yet answered (a hand-off to a successor waits for none).
    fuse_in_flight: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            fuse_ops: Family::default(),
            fuse_total: Counter::default(),
            fuse_seconds: Family::new_with_constructor(latency),
            commit_seconds: latency(),
            commits: Counter::default(),
            proposals: Family::default(),
            replicated_bytes: Family::default(),
            spilled_blocks: Counter::default(),
            spilled_bytes: Counter::default(),
            fuse_in_flight: Default::default(),
        }
    }
}

impl Metrics {
    /// Starts timing one FUSE operation; it is counted, with its latency, when the guard is
    /// dropped (after the reply).
    pub fn fuse_op(self: &Arc<Self>, op: &'static str) -> OpTimer {
        self.fuse_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpTimer {
            metrics: self.clone(),
            op,
            start: Instant::now(),
        }
    }

    /// FUSE requests taken and not yet answered.
    pub fn fuse_in_flight(&self) -> u64 {
        self.fuse_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// One commit of a file's buffered writes took `secs`.
    pub fn commit(&self, secs: f64) {
        self.commit_seconds.observe(secs);
        self.commits.inc();
    }

    /// A proposal this node made: `forwarded` when it went to another node, the leader.
    pub fn proposal(&self, forwarded: bool) {
        let path = if forwarded { "forwarded" } else { "local" };
        self.proposals.get_or_create(&PathLabel { path }).inc();
    }

    /// This node, the leader, wrote `blocks` inline blocks of `bytes` out as block files.
    pub fn spilled(&self, blocks: u64, bytes: u64) {
        self.spilled_blocks.inc_by(blocks);
        self.spilled_bytes.inc_by(bytes);
    }

    /// Block bytes sent to another node (`out`) or taken from one (`in`).
    pub fn replicated(&self, direction: &'static str, bytes: u64) {
        self.replicated_bytes
            .get_or_create(&DirectionLabel { direction })
            .inc_by(bytes);
    }

    /// Totals for `shoal status --watch`, which shows their rates.
    pub fn totals(&self) -> Totals {
        let op = |op| self.fuse_ops.get(&OpLabel { op }).map_or(0, |c| c.get());
        let moved = |direction| {
            self.replicated_bytes
                .get(&DirectionLabel { direction })
                .map_or(0, |c| c.get())
        };
        Totals {
            fuse_ops: self.fuse_total.get(),
            reads: op("read"),
            writes: op("write"),
            fsyncs: op("fsync"),
            replicated_in: moved("in"),
            replicated_out: moved("out"),
            commits: self.commits.get(),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "fuse_ops",
            "FUSE requests answered, by operation",
            self.fuse_ops.clone(),
        );
        r.register(
            "fuse_op_seconds",
            "Time from a FUSE request to its reply, by operation (op=\"fsync\" is the latency of fsync)",
            self.fuse_seconds.clone(),
        );
        r.register(
            "commit_seconds",
            "Time of one commit of a file's buffered writes (blocks written and replicated, layout proposed)",
            self.commit_seconds.clone(),
        );
        r.register(
            "proposals",
            "Metadata proposals this node made, on the leader (local) or sent to it (forwarded)",
            self.proposals.clone(),
        );
        r.register(
            "replicated_bytes",
            "Block bytes copied to other nodes (out) and taken from them (in)",
            self.replicated_bytes.clone(),
        );
        r.register(
            "spilled_blocks",
            "Inline blocks (small commits held in the Raft state) this node wrote out as block files",
            self.spilled_blocks.clone(),
        );
        r.register(
            "spilled_bytes",
            "Bytes of the inline blocks this node wrote out as block files",
            self.spilled_bytes.clone(),
        );
    }
}

/// Counters since the node started, as `shoal status` shows them.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub fuse_ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub fsyncs: u64,
    pub replicated_in: u64,
    pub replicated_out: u64,
    pub commits: u64,
}

/// Times one FUSE operation: see `Metrics::fuse_op`.
pub struct OpTimer {
    metrics: Arc<Metrics>,
    op: &'static str,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.metrics
            .fuse_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        let label = OpLabel { op: self.op };
        self.metrics.fuse_ops.get_or_create(&label).inc();
        self.metrics.fuse_total.inc();
        self.metrics
            .fuse_seconds
            .get_or_create(&label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// What the node is, read when scraped.
#[derive(Debug)]
struct NodeState(Weak<Node>);

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

impl Collector for NodeState {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(node) = self.0.upgrade() else {
            return Ok(());
        };
        let m = node.raft.metrics().borrow().clone();
        let e = &mut e;
        gauge(
            e,
            "raft_term",
            "The Raft term this node is in",
            m.current_term as i64,
        )?;
        gauge(
            e,
            "raft_leader",
            "The node this node knows as the Raft leader (0: none known)",
            m.current_leader.unwrap_or(0) as i64,
        )?;
        gauge(
            e,
            "raft_is_leader",
            "1 on the Raft leader, 0 elsewhere",
            i64::from(m.current_leader == Some(node.id)),
        )?;
        gauge(
            e,
            "raft_last_log_index",
            "The index of the last entry in this node's Raft log",
            m.last_log_index.unwrap_or(0) as i64,
        )?;
        gauge(
            e,
            "raft_applied_index",
            "The index of the last Raft entry applied to this node's state machine",
            m.last_applied.map(|l| l.index).unwrap_or(0) as i64,
        )?;
        gauge(
            e,
            "raft_snapshot_index",
            "The last Raft entry in this node's snapshot",
            m.snapshot.map(|l| l.index).unwrap_or(0) as i64,
        )?;
        let (blocks, bytes) = node
            .blocks
            .list()
            .map(|l| (l.len() as i64, l.iter().map(|(_, n, _)| *n as i64).sum()))
            .unwrap_or((0, 0));
        gauge(e, "blocks_stored", "Blocks on this node's disk", blocks)?;
        gauge(
            e,
            "block_bytes",
            "Bytes of the blocks on this node's disk",
            bytes,
        )?;
        gauge(
            e,
            "garbage_blocks",
            "Blocks no file references any more, listed until every member deleted its copies",
            node.view.garbage(usize::MAX).map_or(0, |g| g.len() as i64),
        )?;
        gauge(
            e,
            "inline_bytes",
            "Bytes of small commits held in the Raft state, not yet written out as block files",
            node.view.inline_bytes().unwrap_or(0) as i64,
        )?;
        gauge(
            e,
            "raft_log_bytes_since_snapshot",
            "Bytes appended to the Raft log since the last snapshot; past max(64 MiB, the snapshot's size) the node takes one",
            node.log_size.since_snapshot() as i64,
        )?;
        gauge(
            e,
            "raft_snapshot_bytes",
            "Size of the last Raft snapshot this node built or installed",
            node.log_size.snapshot_bytes() as i64,
        )?;
        gauge(
            e,
            "blocks_missing",
            "Blocks this node should hold and lacks, as of the last repair round: the repair queue",
            node.repair_missing.load(Ordering::Relaxed) as i64,
        )?;
        counter(
            e,
            "blocks_repaired",
            "Blocks this node fetched to restore their replica count or replace a damaged copy",
            node.repair_fetched.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "blocks_lost",
            "Reads that found a block on no node, each an EIO",
            node.blocks_lost.load(Ordering::Relaxed),
        )?;
        let (hits, misses) = node.cache.hits();
        counter(
            e,
            "cache_hits",
            "Reads of block data served from this node's cache",
            hits,
        )?;
        counter(
            e,
            "cache_misses",
            "Reads of block data that went to a block file, here or on another node",
            misses,
        )?;
        gauge(
            e,
            "cache_bytes",
            "Bytes in this node's block cache",
            node.cache.weight() as i64,
        )?;
        gauge(
            e,
            "dirty_bytes",
            "Written bytes buffered on this node and not yet committed",
            node.dirty_bytes() as i64,
        )?;
        gauge(
            e,
            "open_files",
            "Files open on this node",
            node.files.lock().map(|f| f.len()).unwrap_or(0) as i64,
        )?;
        gauge(
            e,
            "inodes",
            "Inodes in the filesystem",
            node.view.inode_count().unwrap_or(0) as i64,
        )?;
        if let Some(age) = node.session_age() {
            let g = ConstGauge::new(age.as_secs_f64());
            g.encode(e.encode_descriptor(
                "session_lease_age_seconds",
                "Time since this node's session lease was last renewed (it expires at SESSION_LEASE)",
                None,
                g.metric_type(),
            )?)?;
        }
        self.volumes(&node, e)
    }
}

impl NodeState {
    fn volumes(&self, node: &Node, e: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let usage: Vec<(String, shoal_raft::VolumeUsage)> = node
            .view
            .volumes()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| v.trashed.is_none())
            .filter_map(|v| {
                let u = node.view.volume_usage(v.root).ok()??;
                Some((v.name, u))
            })
            .collect();
        type Pick = fn(&shoal_raft::VolumeUsage) -> Option<u64>;
        let families: [(&str, &str, Pick); 3] = [
            ("volume_bytes", "Bytes in the volume's files", |u| {
                Some(u.bytes)
            }),
            ("volume_inodes", "Inodes in the volume", |u| Some(u.inodes)),
            (
                "volume_quota_bytes",
                "The volume's quota (size=), for volumes that have one",
                |u| u.quota,
            ),
        ];
        for (name, help, pick) in families {
            let mut family = e.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (volume, u) in &usage {
                if let Some(v) = pick(u) {
                    let labels = VolumeLabel {
                        volume: volume.clone(),
                    };
                    ConstGauge::new(v as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The registry of `node`'s metrics, prefixed `shoal_`.
pub fn registry(node: &Arc<Node>) -> Registry {
    let mut r = Registry::with_prefix("shoal");
    node.metrics.register(&mut r);
    r.register_collector(Box::new(NodeState(Arc::downgrade(node))));
    r
}

/// Serves `GET /metrics` on `listener` (bound by the caller, so that a bad `--metrics`
/// address fails the start) for as long as the process runs.
pub async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let registry = Arc::new(registry(&node));
    drop(node);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        format!("encoding the metrics failed: {e}\n"),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}
