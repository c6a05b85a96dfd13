//! The cluster's members as operators see them: role, liveness, disk and labels
//! (`shoal node ls`, placement checks), and the name messages give a node.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::Node;

/// The node label that marks a client node (`shoal join --client`): it mounts, reads and
/// writes, but holds no blocks and never votes. Label keys starting `shoal.` are shoal's own;
/// `shoal node label` refuses them.
pub const CLIENT_LABEL: &str = "shoal.client";

impl Node {
    /// The members that are clients: never holders of blocks.
    pub fn clients(&self) -> BTreeSet<u64> {
        self.view
            .nodes()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, info)| info.labels.contains_key(CLIENT_LABEL))
            .map(|(id, _)| id)
            .collect()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// The host's name, as the node last reported it (empty before its first report).
    #[serde(default)]
    pub hostname: String,
    /// leader, voter or learner
    pub role: String,
    /// Whether the node holds a live session: it renewed its lease within the last
    /// few seconds (`SESSION_LEASE`).
    pub up: bool,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The node's data disk as it last reported it; `None` before its first report.
    pub disk: Option<Disk>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Disk {
    pub total: u64,
    pub free: u64,
    /// Seconds since the report, by the cluster clock.
    pub age_secs: u64,
}

pub fn members(node: &Node) -> Result<Vec<Member>, String> {
    let m = node.raft.metrics().borrow().clone();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let now = crate::node::now_nanos();
    let sessions = node.view.sessions().map_err(|e| e.to_string())?;
    let mut infos = node.view.nodes().map_err(|e| e.to_string())?;
    let members = node.members();
    let members = if members.is_empty() {
        // A node without a cluster is its own only member.
        vec![(node.id, String::new())]
    } else {
        members
    };
    Ok(members
        .into_iter()
        .map(|(id, addr)| {
            let info = infos.remove(&id).unwrap_or_default();
            let client = info.labels.contains_key(CLIENT_LABEL);
            Member {
                id,
                addr,
                role: if client {
                    "client"
                } else if m.current_leader == Some(id) {
                    "leader"
                } else if voters.contains(&id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                up: sessions
                    .iter()
                    .any(|(_, n, until)| *n == id && *until >= now),
                disk: (info.reported_at > 0).then(|| Disk {
                    total: info.disk_total,
                    free: info.disk_free,
                    age_secs: (now.saturating_sub(info.reported_at).max(0) / 1_000_000_000) as u64,
                }),
                labels: info.labels,
                hostname: info.hostname,
            }
        })
        .collect())
}

/// A node as messages name it: `sw2 (node 2, 10.0.0.2:7440)`, or `node 2` when the cluster
/// knows neither its host name nor its address.
pub fn node_name(node: &Node, id: u64) -> String {
    let host = node
        .view
        .nodes()
        .ok()
        .and_then(|mut n| n.remove(&id))
        .map(|i| i.hostname)
        .unwrap_or_default();
    let addr = node
        .members()
        .into_iter()
        .find(|(m, _)| *m == id)
        .map(|(_, a)| a)
        .unwrap_or_default();
    match (host.is_empty(), addr.is_empty()) {
        (true, true) => format!("node {id}"),
        (true, false) => format!("node {id} ({addr})"),
        (false, true) => format!("{host} (node {id})"),
        (false, false) => format!("{host} (node {id}, {addr})"),
    }
}
