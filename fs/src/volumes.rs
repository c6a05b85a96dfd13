//! Volumes as Docker and `shoal volume` both create and explain them: `-o` options parsed and
//! checked against the cluster, creation (or a clone), and each refusal worded for the user.
//! The plugin (`plugin`) and the admin socket (`admin`) call this; neither calls the other.

use shoal_raft::{FsError, MetaCommand, Volume, VolumeOptions, check_label, check_volume_name};
use tracing::info;

use crate::cluster::members::{members, node_name};
use crate::node::{Node, OpError};

/// The options `docker volume create -o` takes.
pub const OPTIONS: &str = "replicas=N (1 to 16, at most the number of nodes), size=SIZE (a quota, e.g. 10GiB), placement=KEY==VALUE[,KEY!=VALUE…] (node labels), from=VOLUME (a copy-on-write clone)";

/// Parses `-o` options; refuses unknown ones and bad values with the list of valid ones.
pub fn parse_options(
    opts: &std::collections::BTreeMap<String, String>,
) -> Result<VolumeOptions, String> {
    let mut out = VolumeOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "replicas" => match v.parse::<u32>() {
                Ok(n @ 1..=16) => out.replicas = Some(n),
                _ => return Err(format!("replicas={v:?} is not a number from 1 to 16")),
            },
            "size" => match v.parse::<bytesize::ByteSize>() {
                // The parser saturates: a size past what a file can hold (8 EiB) is a typo.
                Ok(s) if s.as_u64() > i64::MAX as u64 => {
                    return Err(format!(
                        "size={v:?} is larger than a volume can be (8 EiB); give a size such as 512MiB or 10GiB"
                    ));
                }
                Ok(s) if s.as_u64() > 0 => out.size = Some(s.as_u64()),
                _ => return Err(format!("size={v:?} is not a size such as 512MiB or 10GiB")),
            },
            "placement" => {
                for rule in v.split(',') {
                    let (key, equal, value) = if let Some((k, v)) = rule.split_once("!=") {
                        (k, false, v)
                    } else if let Some((k, v)) = rule.split_once("==") {
                        (k, true, v)
                    } else {
                        return Err(format!(
                            "placement rule {rule:?} is not KEY==VALUE or KEY!=VALUE (e.g. storage==ssd)"
                        ));
                    };
                    check_label(key, value)?;
                    out.placement.push((key.into(), equal, value.into()));
                }
            }
            "from" => {
                check_volume_name(v).map_err(|e| format!("from={v:?}: {e}"))?;
                out.from = Some(v.clone());
            }
            _ => return Err(format!("unknown option {k:?}; valid options are {OPTIONS}")),
        }
    }
    Ok(out)
}

/// Refuses options this cluster cannot honour: more replicas than nodes, or than nodes that
/// match the placement.
pub fn check_fits(node: &Node, options: &VolumeOptions) -> Result<(), String> {
    let members = members(node)?;
    let matching: Vec<u64> = members
        .iter()
        .filter(|m| options.admits(&m.labels))
        .map(|m| m.id)
        .collect();
    let wanted = options.replicas.map_or(1, |r| r as usize);
    if !options.placement.is_empty() && matching.is_empty() {
        return Err(format!(
            "no node matches placement={}: label nodes with `shoal node label add NODE KEY=VALUE` (see `shoal node ls`)",
            options.placement_text()
        ));
    }
    if wanted > matching.len() {
        let among = if options.placement.is_empty() {
            String::new()
        } else {
            format!(" matching placement={}", options.placement_text())
        };
        return Err(format!(
            "replicas={wanted} but the cluster has {} node(s){among}: use replicas={} or fewer, or add nodes",
            matching.len(),
            matching.len()
        ));
    }
    Ok(())
}

/// Creates a volume from `-o` options: what `docker volume create` and `shoal volume create`
/// both do.
pub async fn create_volume(
    node: &Node,
    name: &str,
    opts: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    check_volume_name(name)?;
    let options = parse_options(opts)?;
    check_fits(node, &options)?;
    let from = options.from.clone();
    let cmd = MetaCommand::CreateVolume {
        name: name.to_string(),
        options,
    };
    match (node.run(cmd).await, from) {
        (Ok(_), _) => {
            node.forget_volume_entry(name);
            info!(volume = %name, "volume created (or there already, with these options)");
            Ok(())
        }
        (Err(OpError::Fs(FsError::Exists)), _) => Err(differences(node, name, opts)),
        (Err(OpError::Fs(FsError::NotFound)), Some(from)) => Err(format!(
            "cannot clone volume {from} into {name}: no such volume: {from} (see `docker volume ls`)"
        )),
        (Err(OpError::Fs(FsError::QuotaExceeded)), Some(from)) => Err(format!(
            "cannot clone volume {from} into {name}: its files do not fit in size={}",
            opts.get("size").map_or("", String::as_str)
        )),
        (Err(e), _) => Err(explain(name, e, node)),
    }
}

/// Why a Create of an existing volume was refused: each option it asks that the volume does
/// not have.
fn differences(
    node: &Node,
    name: &str,
    opts: &std::collections::BTreeMap<String, String>,
) -> String {
    let (Ok(Some(v)), Ok(asked)) = (node.view.volume(name), parse_options(opts)) else {
        return format!("volume {name} already exists with other options");
    };
    let show = |field: &str, value: &str| match (field, value.parse::<u64>()) {
        ("size", Ok(n)) => format!("size={}", bytesize::ByteSize(n).display().iec()),
        _ => format!("{field}={value}"),
    };
    let (has, asks): (Vec<String>, Vec<String>) = v
        .options
        .conflicts(&asked)
        .into_iter()
        .map(|(field, has, asks)| (show(field, &has), show(field, &asks)))
        .unzip();
    format!(
        "volume {name} exists with {}; this Create asks {}: create it with the options it has (`docker volume inspect {name}`), or pick another name",
        has.join(", "),
        asks.join(", ")
    )
}

fn node_list(node: &Node, v: &Volume) -> String {
    v.mounts_per_node()
        .iter()
        .map(|(n, _)| node_name(node, *n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A volume command's outcome as the message a Docker user reads.
pub fn explain(name: &str, e: OpError, node: &Node) -> String {
    match e {
        OpError::Fs(FsError::Exists) => format!("volume {name} already exists"),
        OpError::Fs(FsError::NotFound) => format!("no such volume: {name}"),
        OpError::Fs(FsError::Busy) => {
            let on = node
                .view
                .volume(name)
                .ok()
                .flatten()
                .map(|v| node_list(node, &v))
                .unwrap_or_default();
            format!("volume {name} is in use on {on}: stop the containers using it first")
        }
        OpError::Fs(FsError::NotPermitted) => format!(
            "volume {name} is not in the trash: remove it first (`docker volume rm {name}` or `shoal volume rm {name}`)"
        ),
        OpError::Fs(FsError::Invalid) => check_volume_name(name)
            .err()
            .unwrap_or_else(|| format!("invalid request for volume {name}")),
        other => format!("volume {name}: {other}"),
    }
}
