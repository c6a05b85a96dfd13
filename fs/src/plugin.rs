//! The Docker volume plugin: Docker's volume plugin protocol (JSON over HTTP on a unix socket)
//! served by the daemon. A volume is the directory `/volumes/NAME` of the filesystem, recorded
//! in Raft with its options and its mounts; `Mount` answers a path in this node's FUSE mount,
//! so every node serves the same content. Scope `global`: a volume is one object for the
//! whole cluster.
//!
//! Every answer is HTTP 200 with Docker's JSON; a failure is the `Err` field, written for a
//! Docker user.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use shoal_raft::{MetaCommand, Reply, Volume, check_volume_name};
use tracing::{info, warn};

use crate::node::{Node, OpError};
use crate::volumes::{VolumeError, explain};

struct Plugin {
    node: Arc<Node>,
    mount: PathBuf,
}

type Shared = State<Arc<Plugin>>;

/// Serves the plugin on `socket` until the task is dropped. `mount` is this node's FUSE
/// mount point.
pub async fn serve(node: Arc<Node>, mountpoint: PathBuf, socket: PathBuf) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The data directory is locked by this daemon, so a socket left at this path is stale.
    let _ = std::fs::remove_file(&socket);
    // Root and the docker group, who can run containers with any volume anyway; root only
    // where there is no docker group.
    let group = crate::private::docker_gid();
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let listener = crate::private::bind_socket(&socket, mode, group)?;
    info!(socket = %socket.display(), mode = format!("{mode:o}"), group = ?group, "serving the Docker volume plugin");
    let plugin = Arc::new(Plugin {
        node,
        mount: mountpoint,
    });
    let app = Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .with_state(plugin);
    axum::serve(listener, app).await
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Req {
    pub(crate) name: String,
    #[serde(rename = "ID")]
    pub(crate) id: String,
    pub(crate) opts: Option<std::collections::BTreeMap<String, String>>,
}

/// Docker's request body; an empty body is an empty request.
pub(crate) fn parse(body: &Bytes) -> Result<Req, VolumeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Req::default());
    }
    serde_json::from_slice(body).map_err(|e| VolumeError::BadRequest(e.to_string()))
}

/// A refusal as Docker reads it: the only place a `VolumeError` becomes Docker's `Err`.
fn err(e: VolumeError) -> axum::Json<Value> {
    let msg = e.to_string();
    warn!(error = %msg, "volume plugin request refused");
    axum::Json(json!({ "Err": msg }))
}

async fn activate() -> axum::Json<Value> {
    axum::Json(json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities() -> axum::Json<Value> {
    axum::Json(json!({ "Capabilities": { "Scope": "global" } }))
}

impl Plugin {
    fn mountpoint(&self, name: &str) -> PathBuf {
        self.mount.join("volumes").join(name)
    }

    async fn run(&self, name: &str, cmd: MetaCommand) -> Result<Reply, VolumeError> {
        check_volume_name(name)?;
        self.node
            .run(cmd)
            .await
            .map_err(|e| explain(name, e, &self.node))
    }

    /// The volume, read linearizably (a volume created on another node a moment ago is seen).
    async fn volume(&self, name: &str) -> Result<Volume, VolumeError> {
        check_volume_name(name)?;
        let failed = |error| VolumeError::Failed {
            name: name.to_string(),
            error,
        };
        self.node.read_barrier().await.map_err(failed)?;
        match self.node.view.volume(name) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(VolumeError::NotFound(name.to_string())),
            Err(e) => Err(failed(OpError::Store(e))),
        }
    }

    fn describe(&self, v: &Volume) -> Value {
        let mut status = json!({
            "replicas": v.options.replicas,
            "size": v.options.size,
            "mounts": v.mounts.iter().map(|(n, id, _)| json!({"node": n, "id": id})).collect::<Vec<_>>(),
        });
        if !v.options.placement.is_empty() {
            status["placement"] = json!(v.options.placement_text());
        }
        if let Some(from) = &v.options.from {
            status["from"] = json!(from);
        }
        json!({
            "Name": v.name,
            "Mountpoint": self.mountpoint(&v.name),
            "Status": status,
        })
    }
}

/// Docker's answer: the handler's fields with an empty `Err`, or only `Err`.
fn answer(r: Result<Value, VolumeError>) -> axum::Json<Value> {
    match r {
        Ok(mut v) => {
            v["Err"] = json!("");
            axum::Json(v)
        }
        Err(e) => err(e),
    }
}

async fn create(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    answer(
        async {
            let r = parse(&body)?;
            crate::volumes::create_volume(&p.node, &r.name, &r.opts.unwrap_or_default()).await?;
            Ok(json!({}))
        }
        .await,
    )
}

async fn remove(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    answer(
        async {
            let r = parse(&body)?;
            let cmd = MetaCommand::TrashVolume {
                name: r.name.clone(),
            };
            p.run(&r.name, cmd).await?;
            p.node.forget_volume_entry(&r.name);
            info!(volume = %r.name, "volume moved to the trash");
            Ok(json!({}))
        }
        .await,
    )
}

/// Records this node's mount (`mount`) or unmount of the volume for Docker's mount id.
async fn record(p: &Plugin, r: &Req, mount: bool) -> Result<(), VolumeError> {
    let cmd = MetaCommand::MountVolume {
        name: r.name.clone(),
        node: p.node.id,
        id: r.id.clone(),
        mount,
    };
    p.run(&r.name, cmd).await.map(drop)
}

async fn mount(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    answer(
        async {
            let r = parse(&body)?;
            p.volume(&r.name).await?;
            record(&p, &r, true).await?;
            // Answer only once the directory is there through this node's mount: a
            // container must never start on an empty or half-ready directory.
            let path = p.mountpoint(&r.name);
            ready(&path)
                .await
                .map_err(|error| VolumeError::Unreachable {
                    name: r.name.clone(),
                    path: path.display().to_string(),
                    error,
                })?;
            Ok(json!({ "Mountpoint": path }))
        }
        .await,
    )
}

async fn ready(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            Ok(())
        } else {
            Err(std::io::Error::other("not a directory"))
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn unmount(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    answer(
        async {
            record(&p, &parse(&body)?, false).await?;
            Ok(json!({}))
        }
        .await,
    )
}

async fn path(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    answer(
        async {
            let v = p.volume(&parse(&body)?.name).await?;
            Ok(json!({ "Mountpoint": p.mountpoint(&v.name) }))
        }
        .await,
    )
}

/// Docker calls Create after an error here, so an unknown volume must be an error; it is
/// Docker's normal first step, so it is not logged as a refusal.
async fn get(State(p): Shared, body: Bytes) -> axum::Json<Value> {
    let found: Result<Value, VolumeError> = async {
        let v = p.volume(&parse(&body)?.name).await?;
        Ok(json!({ "Volume": p.describe(&v) }))
    }
    .await;
    match found {
        Ok(v) => answer(Ok(v)),
        Err(e) => axum::Json(json!({ "Err": e.to_string() })),
    }
}

async fn list(State(p): Shared) -> axum::Json<Value> {
    answer(
        async {
            p.node.read_barrier().await.map_err(VolumeError::Listing)?;
            let vs = p
                .node
                .view
                .volumes()
                .map_err(|e| VolumeError::Listing(OpError::Store(e)))?;
            let vs: Vec<Value> = vs
                .iter()
                .map(|v| json!({"Name": v.name, "Mountpoint": p.mountpoint(&v.name)}))
                .collect();
            Ok(json!({ "Volumes": vs }))
        }
        .await,
    )
}
