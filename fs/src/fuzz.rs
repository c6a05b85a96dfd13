//! Entry points for `cargo fuzz` (see `fuzz/`) and for the replay of its corpus in the tests:
//! what a container, a local user or a peer can send a node, as bytes. Each must neither panic
//! nor break an invariant it checks.

use shoal_net::frame;
use shoal_net::token::JoinToken;

use crate::admin::AdminRequest;
use crate::cluster::rpc::{Request, Response};

/// A fuzz target: arbitrary bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name: the directory names under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("plugin_request", plugin_request),
    ("admin_request", admin_request),
    ("rpc_request", rpc_request),
    ("raft_entry", shoal_raft::fuzz::log_entry),
    ("join_token", join_token),
    ("names", shoal_raft::fuzz::names),
];

/// A Docker volume plugin request body and the `-o` options in it.
pub fn plugin_request(bytes: &[u8]) {
    let Ok(req) = crate::plugin::parse(&bytes::Bytes::copy_from_slice(bytes)) else {
        return;
    };
    let _ = shoal_raft::check_volume_name(&req.name);
    if let Some(opts) = &req.opts
        && let Ok(o) = crate::volumes::parse_options(opts)
    {
        assert!(o.replicas.is_none_or(|r| (1..=16).contains(&r)));
        assert!(o.size.is_none_or(|s| s > 0 && s <= i64::MAX as u64));
        if let Some(from) = &o.from {
            assert!(shoal_raft::check_volume_name(from).is_ok());
        }
    }
}

/// A frame on the admin socket, as the daemon reads it.
pub fn admin_request(bytes: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut r = bytes;
    let _ = rt.block_on(frame::read_within::<_, AdminRequest>(
        &mut r,
        crate::admin::MAX_REQUEST,
    ));
}

/// A node-to-node request or response body, as `shoal_net::rpc` decodes it. Decoded on a
/// thread with a 256 KiB stack, so that a type nesting without bound (as openraft's errors
/// did) overflows within the fuzzer's input sizes instead of only at a real frame's 80 MiB
/// on a 2 MiB tokio worker.
pub fn rpc_request(bytes: &[u8]) {
    let decode = || {
        let kind = postcard::take_from_bytes::<u32>(bytes).ok().map(|(k, _)| k);
        let _ = Request::max_frame(false, kind);
        let _ = postcard::from_bytes::<Request>(bytes);
        let _ = postcard::from_bytes::<Response>(bytes);
    };
    std::thread::scope(|s| {
        let decoded = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn_scoped(s, decode)
            .expect("a decoding thread")
            .join();
        if let Err(panic) = decoded {
            std::panic::resume_unwind(panic);
        }
    });
}

/// A join token as a user pastes it: one that parses prints back as itself.
pub fn join_token(bytes: &[u8]) {
    let Ok(s) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(t) = s.parse::<JoinToken>() {
        assert_eq!(t.to_string().parse::<JoinToken>().ok(), Some(t), "{s:?}");
        assert_eq!(
            t.to_string().to_ascii_lowercase(),
            s.trim().to_ascii_lowercase()
        );
    }
}

/// Well-formed inputs for each target, from which the fuzzer starts (written to
/// `fuzz/corpus/` by `cargo test -p shoal-fs --lib -- --ignored write_fuzz_seeds`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use shoal_raft::{MetaCommand, MetaRequest, ROOT_INO};
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for body in [
        r#"{"Name":"data","Opts":{"replicas":"2","size":"1GiB","placement":"storage==ssd,zone!=b"}}"#,
        r#"{"Name":"copy","Opts":{"from":"data"}}"#,
        r#"{"Name":"data","ID":"f00d"}"#,
        "",
    ] {
        out.push(("plugin_request", body.as_bytes().to_vec()));
    }
    let volume = |v| AdminRequest::Volume(v);
    for req in [
        AdminRequest::Status,
        AdminRequest::RemoveNode(3),
        AdminRequest::Label {
            node: 2,
            key: "zone".into(),
            value: Some("a".into()),
        },
        volume(crate::admin::VolumeRequest::Create {
            name: "data".into(),
            options: [("replicas".to_string(), "2".to_string())].into(),
        }),
        volume(crate::admin::VolumeRequest::Restore {
            name: "data".into(),
            id: Some(4),
            rename: Some("old".into()),
        }),
    ] {
        let json = serde_json::to_vec(&req).expect("json");
        let mut framed = (json.len() as u32).to_be_bytes().to_vec();
        framed.extend(json);
        out.push(("admin_request", framed));
    }
    let id = shoal_raft::BlockId([5; 32]);
    for req in [
        Request::GetBlock {
            id,
            len: Some(4096),
        },
        Request::HasBlocks { ids: vec![id, id] },
        Request::PutBlock {
            id,
            data: vec![1, 2, 3],
        },
        Request::ReadIndex,
        Request::AddMember {
            id: 4,
            addr: "127.0.0.1:7000".into(),
            client: false,
        },
    ] {
        out.push(("rpc_request", postcard::to_stdvec(&req).expect("postcard")));
    }
    let request = MetaRequest {
        now: 10,
        session: 7,
        seq: 1,
        acked: 0,
        cmds: vec![
            MetaCommand::Create {
                parent: ROOT_INO,
                name: b"d".to_vec(),
                kind: shoal_raft::FileKind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: vec![],
            },
            MetaCommand::AllocNodeId,
            MetaCommand::RevokeNode { node: 3 },
        ],
    };
    let entry = openraft::Entry::<shoal_raft::TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 5),
        payload: openraft::EntryPayload::Normal(request),
    };
    out.push(("raft_entry", postcard::to_stdvec(&entry).expect("postcard")));
    let token = JoinToken::new([0xab; 32]).to_string();
    out.push(("join_token", token.into_bytes()));
    for name in ["data", "web-1-vol", "storage=ssd", "a.b_c-d"] {
        out.push(("names", name.as_bytes().to_vec()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
    }

    /// Every input the fuzzer kept (and every crash it found, once fixed) runs on stable too.
    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let mut ran = 0;
        for (target, run) in TARGETS {
            let dir = corpus().join(target);
            let files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!files.is_empty(), "no corpus for {target}");
            eprintln!("replaying {target}: {} inputs", files.len());
            for f in files {
                let bytes = std::fs::read(&f).unwrap();
                run(&bytes);
                ran += 1;
            }
        }
        for (target, bytes) in seeds() {
            let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
            run(&bytes);
        }
        eprintln!("replayed {ran} corpus inputs");
    }

    #[test]
    #[ignore = "writes the seed inputs into fuzz/corpus; run by hand"]
    fn write_fuzz_seeds() {
        for (k, (target, bytes)) in seeds().into_iter().enumerate() {
            let dir = corpus().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{k:02}")), bytes).unwrap();
        }
    }
}
