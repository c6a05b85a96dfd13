//! Volumes as Docker and `shoal volume` both create and explain them: `-o` options parsed and
//! checked against the cluster, creation (or a clone), and each refusal worded for the user.
//! The plugin (`plugin`) and the admin socket (`admin`) call this; neither calls the other.

use shoal_raft::{
    FsError, MetaCommand, NameError, Volume, VolumeOptions, check_label, check_volume_name,
};
use tracing::info;

use crate::node::members::{members, node_name};
use crate::node::{Node, OpError};

/// Why a volume command was refused, worded for the Docker user who reads it (the plugin's
/// `Err`, the admin socket's error).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Name(#[from] NameError),
    /// A request body Docker sent that is not its volume protocol.
    #[error("bad request from Docker: {0}")]
    BadRequest(String),
    /// The volume's directory is not there through this node's mount.
    #[error("volume {name} is not reachable at {path}: {error}")]
    Unreachable {
        name: String,
        path: String,
        error: std::io::Error,
    },
    #[error("replicas={0:?} is not a number from 1 to 16")]
    Replicas(String),
    #[error(
        "size={0:?} is larger than a volume can be (8 EiB); give a size such as 512MiB or 10GiB"
    )]
    SizeTooLarge(String),
    #[error("size={0:?} is not a size such as 512MiB or 10GiB")]
    Size(String),
    #[error("placement rule {0:?} is not KEY==VALUE or KEY!=VALUE (e.g. storage==ssd)")]
    PlacementRule(String),
    #[error("from={from:?}: {source}")]
    From { from: String, source: NameError },
    #[error("unknown option {0:?}; valid options are {OPTIONS}")]
    UnknownOption(String),
    #[error(
        "no node matches placement={0}: label nodes with `shoal node label add NODE KEY=VALUE` (see `shoal node ls`)"
    )]
    NoNodeMatches(String),
    /// More replicas than nodes (`among`: " matching placement=…", or empty).
    #[error(
        "replicas={wanted} but the cluster has {have} node(s){among}: use replicas={have} or fewer, or add nodes"
    )]
    TooFewNodes {
        wanted: usize,
        have: usize,
        among: String,
    },
    #[error("volume {0} already exists with other options")]
    OtherOptions(String),
    #[error(
        "volume {name} exists with {has}; this Create asks {asks}: create it with the options it has (`docker volume inspect {name}`), or pick another name"
    )]
    Differs {
        name: String,
        has: String,
        asks: String,
    },
    #[error(
        "cannot clone volume {from} into {name}: no such volume: {from} (see `docker volume ls`)"
    )]
    NoSource { from: String, name: String },
    #[error("cannot clone volume {from} into {name}: its files do not fit in size={size}")]
    CloneTooBig {
        from: String,
        name: String,
        size: String,
    },
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("volume {name} is in use on {on}: stop the containers using it first")]
    InUse { name: String, on: String },
    #[error(
        "volume {0} is not in the trash: remove it first (`docker volume rm {0}` or `shoal volume rm {0}`)"
    )]
    NotInTrash(String),
    #[error("invalid request for volume {0}")]
    Invalid(String),
    #[error("volume {name}: {error}")]
    Failed { name: String, error: OpError },
    #[error("listing volumes: {0}")]
    Listing(OpError),
    #[error(
        "several removed volumes named {name} are in the trash (ids {ids}): say which with --id"
    )]
    AmbiguousTrash { name: String, ids: String },
    #[error("no removed volume {name} with id {id} is in the trash (see `shoal volume ls`)")]
    NotInTrashWithId { name: String, id: u64 },
    #[error("no removed volume {0} is in the trash (see `shoal volume ls`)")]
    NoneInTrash(String),
    #[error(
        "a live volume is named {to}: restore the removed one under another name with `shoal volume restore {name} --as NEW`"
    )]
    LiveNamed { name: String, to: String },
    #[error("{0} s is too long a retention")]
    RetentionTooLong(u64),
    /// The cluster's view could not be read, or names no such node.
    #[error("{0}")]
    Cluster(String),
    #[error(transparent)]
    Op(#[from] OpError),
    #[error("metadata store: {0}")]
    Store(#[from] shoal_raft::StoreError),
}

/// The options `docker volume create -o` takes.
pub const OPTIONS: &str = "replicas=N (1 to 16, at most the number of nodes), size=SIZE (a quota, e.g. 10GiB), placement=KEY==VALUE[,KEY!=VALUE…] (node labels), from=VOLUME (a copy-on-write clone)";

/// Parses `-o` options; refuses unknown ones and bad values with the list of valid ones.
pub fn parse_options(
    opts: &std::collections::BTreeMap<String, String>,
) -> Result<VolumeOptions, VolumeError> {
    let mut out = VolumeOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "replicas" => match v.parse::<u32>() {
                Ok(n @ 1..=16) => out.replicas = Some(n),
                _ => return Err(VolumeError::Replicas(v.clone())),
            },
            "size" => match v.parse::<bytesize::ByteSize>() {
                // The parser saturates: a size past what a file can hold (8 EiB) is a typo.
                Ok(s) if s.as_u64() > i64::MAX as u64 => {
                    return Err(VolumeError::SizeTooLarge(v.clone()));
                }
                Ok(s) if s.as_u64() > 0 => out.size = Some(s.as_u64()),
                _ => return Err(VolumeError::Size(v.clone())),
            },
            "placement" => {
                for rule in v.split(',') {
                    let (key, equal, value) = if let Some((k, v)) = rule.split_once("!=") {
                        (k, false, v)
                    } else if let Some((k, v)) = rule.split_once("==") {
                        (k, true, v)
                    } else {
                        return Err(VolumeError::PlacementRule(rule.to_string()));
                    };
                    check_label(key, value)?;
                    out.placement.push((key.into(), equal, value.into()));
                }
            }
            "from" => {
                check_volume_name(v).map_err(|source| VolumeError::From {
                    from: v.clone(),
                    source,
                })?;
                out.from = Some(v.clone());
            }
            _ => return Err(VolumeError::UnknownOption(k.clone())),
        }
    }
    Ok(out)
}

/// Refuses options this cluster cannot honour: more replicas than nodes, or than nodes that
/// match the placement.
pub fn check_fits(node: &Node, options: &VolumeOptions) -> Result<(), VolumeError> {
    let members = members(node).map_err(VolumeError::Cluster)?;
    let matching: Vec<u64> = members
        .iter()
        .filter(|m| options.admits(&m.labels))
        .map(|m| m.id)
        .collect();
    let wanted = options.replicas.map_or(1, |r| r as usize);
    if !options.placement.is_empty() && matching.is_empty() {
        return Err(VolumeError::NoNodeMatches(options.placement_text()));
    }
    if wanted > matching.len() {
        let among = if options.placement.is_empty() {
            String::new()
        } else {
            format!(" matching placement={}", options.placement_text())
        };
        return Err(VolumeError::TooFewNodes {
            wanted,
            have: matching.len(),
            among,
        });
    }
    Ok(())
}

/// Creates a volume from `-o` options: what `docker volume create` and `shoal volume create`
/// both do.
pub async fn create_volume(
    node: &Node,
    name: &str,
    opts: &std::collections::BTreeMap<String, String>,
) -> Result<(), VolumeError> {
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
        (Err(OpError::Fs(FsError::NotFound)), Some(from)) => Err(VolumeError::NoSource {
            from,
            name: name.to_string(),
        }),
        (Err(OpError::Fs(FsError::QuotaExceeded)), Some(from)) => Err(VolumeError::CloneTooBig {
            from,
            name: name.to_string(),
            size: opts.get("size").cloned().unwrap_or_default(),
        }),
        (Err(e), _) => Err(explain(name, e, node)),
    }
}

/// Why a Create of an existing volume was refused: each option it asks that the volume does
/// not have.
fn differences(
    node: &Node,
    name: &str,
    opts: &std::collections::BTreeMap<String, String>,
) -> VolumeError {
    let (Ok(Some(v)), Ok(asked)) = (node.view.volume(name), parse_options(opts)) else {
        return VolumeError::OtherOptions(name.to_string());
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
    VolumeError::Differs {
        name: name.to_string(),
        has: has.join(", "),
        asks: asks.join(", "),
    }
}

fn node_list(node: &Node, v: &Volume) -> String {
    v.mounts_per_node()
        .iter()
        .map(|(n, _)| node_name(node, *n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A volume command's failure as the refusal a Docker user reads.
pub fn explain(name: &str, e: OpError, node: &Node) -> VolumeError {
    let name = name.to_string();
    match e {
        OpError::Fs(FsError::Exists) => VolumeError::Exists(name),
        OpError::Fs(FsError::NotFound) => VolumeError::NotFound(name),
        OpError::Fs(FsError::Busy) => {
            let on = node
                .view
                .volume(&name)
                .ok()
                .flatten()
                .map(|v| node_list(node, &v))
                .unwrap_or_default();
            VolumeError::InUse { name, on }
        }
        OpError::Fs(FsError::NotPermitted) => VolumeError::NotInTrash(name),
        OpError::Fs(FsError::Invalid) => match check_volume_name(&name) {
            Err(e) => VolumeError::Name(e),
            Ok(()) => VolumeError::Invalid(name),
        },
        error => VolumeError::Failed { name, error },
    }
}
