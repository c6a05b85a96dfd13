//! What a container, a local user or a stranger on the network can do to a node: setuid
//! binaries and device nodes left in a volume, the daemon's sockets and data directory, and
//! connections without a certificate that send too much or never finish.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cluster::LocalCluster;
use crate::testkit::{Daemon, shoal};

/// Runs `argv` as user and group nobody (65534), with no supplementary groups.
fn as_nobody(argv: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim().to_string()
}

/// The options of the mount at `path`, from /proc/self/mountinfo.
fn mount_options(path: &std::path::Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_setuid_binary_or_a_device_node_left_in_a_volume_gives_nothing_on_the_host() {
    let d = Daemon::start();
    // Let nobody reach the mount (the temp dir is root's alone).
    fs::set_permissions(d.root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = d.mnt();
    let opts = mount_options(&m);
    assert!(
        opts.contains("nosuid") && opts.contains("nodev"),
        "mount options {opts}"
    );

    // What root in a container could do: a setuid-root copy of `id` in the volume.
    fs::copy("/usr/bin/id", m.join("id")).unwrap();
    fs::set_permissions(m.join("id"), fs::Permissions::from_mode(0o4755)).unwrap();
    let meta = fs::metadata(m.join("id")).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o4755),
        "the bit is kept"
    );
    let out = as_nobody(&[m.join("id").to_str().unwrap(), "-u"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "65534",
        "the setuid bit raised privileges"
    );

    // The same binary with the bit on a filesystem that honours it does run as root: the
    // check above can tell the difference.
    let control = d.root.path().join("id");
    fs::copy("/usr/bin/id", &control).unwrap();
    fs::set_permissions(&control, fs::Permissions::from_mode(0o4755)).unwrap();
    let nosuid = rustix::fs::StatVfsMountFlags::NOSUID;
    if !rustix::fs::statvfs(&control)
        .unwrap()
        .f_flag
        .contains(nosuid)
    {
        let out = as_nobody(&[control.to_str().unwrap(), "-u"]);
        assert_eq!(text(&out.stdout), "0", "control: {out:?}");
        eprintln!("control: the same setuid binary on the host's disk ran as uid 0");
    }

    // A device node (the kernel's /dev/null, 1:3, world-writable) can be made and listed, but
    // not opened, not even by root.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.join("null").as_path(),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let meta = fs::metadata(m.join("null")).unwrap();
    assert_eq!(meta.rdev(), rustix::fs::makedev(1, 3));
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.join("null"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
}

#[test]
fn the_sockets_and_the_data_directory_are_the_daemons_alone() {
    let mut d = Daemon::start();
    fs::set_permissions(d.root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let data_mode = fs::metadata(d.data()).unwrap().mode() & 0o777;
    assert_eq!(
        data_mode, 0o700,
        "shoal init makes the data directory root's"
    );
    let admin = d.data().join("admin.sock");
    let plugin = d.plugin_socket();
    assert_eq!(fs::metadata(&admin).unwrap().mode() & 0o777, 0o600);
    let meta = fs::metadata(&plugin).unwrap();
    match shoal_fs::private::docker_gid() {
        Some(gid) => assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid)),
        None => assert_eq!(meta.mode() & 0o777, 0o600),
    }

    // nobody cannot talk to the plugin (it can make and remove volumes), while it can talk to a
    // socket that allows it in the same directory: the refusal is the socket's own mode.
    let open = d.root.path().join("open.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
    let connect = |path: &std::path::Path| {
        as_nobody(&[
            "/usr/bin/python3",
            "-c",
            "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            path.to_str().unwrap(),
        ])
    };
    let out = connect(&open);
    assert!(out.status.success(), "control: {out:?}");
    let out = connect(&plugin);
    assert!(
        !out.status.success() && text(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );

    // A data directory others may write to is refused, with what to do.
    d.stop();
    fs::set_permissions(d.data(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(shoal())
        .arg("daemon")
        .arg("--data")
        .arg(d.data())
        .arg("--mount")
        .arg(d.mnt())
        .arg("--no-plugin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("can be written by other users") && err.contains("chmod go-w"),
        "{err}"
    );
    fs::set_permissions(d.data(), fs::Permissions::from_mode(0o750)).unwrap();
    d.restart();
    assert!(fs::read_dir(d.mnt()).is_ok());
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// One stranger: a QUIC client without a certificate from `source`, trusting the cluster's CA.
fn stranger(source: &str, fingerprint: [u8; 32]) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client(source.parse().unwrap()).unwrap();
    ep.set_default_client_config(shoal_net::quic::join_client_config(fingerprint).unwrap());
    ep
}

/// Sends what a stranger might: an 80 MiB frame and 8 MiB of it on one stream, half a frame
/// and silence on another. Returns how many bytes the node took before it closed the door.
async fn attack(ep: &quinn::Endpoint, addr: std::net::SocketAddr) -> u64 {
    let Ok(conn) = shoal_net::quic::connect(ep, addr).await else {
        return 0;
    };
    let stall = async {
        let (mut send, _recv) = conn.open_bi().await.ok()?;
        send.write_all(&1000u32.to_be_bytes()).await.ok()?;
        send.write_all(&[0u8; 10]).await.ok()?;
        conn.closed().await;
        Some(())
    };
    let flood = async {
        let (mut send, _recv) = conn.open_bi().await.ok()?;
        send.write_all(&(80u32 << 20).to_be_bytes()).await.ok()?;
        let chunk = vec![0xAAu8; 1 << 20];
        let mut taken = 0u64;
        for _ in 0..8 {
            match send.write(&chunk).await {
                Ok(n) => taken += n as u64,
                Err(_) => break,
            }
        }
        Some(taken)
    };
    let (_, taken) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(15), stall),
        tokio::time::timeout(Duration::from_secs(15), flood)
    );
    taken.ok().flatten().unwrap_or(0)
}

#[test]
fn strangers_sending_huge_and_endless_frames_cost_a_node_nothing() {
    let c = LocalCluster::up(3);
    let token: shoal_net::token::JoinToken =
        fs::read_to_string(c.data(1).join("tls").join("join-token"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let fingerprint = token.ca_fingerprint;
    let leader_pid = c.pid(1);
    let before = rss(leader_pid);

    // Meanwhile the cluster serves its own: node 2 writes and fsyncs, node 3 reads it back.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, done) = (stop.clone(), done.clone());
        let (m2, m3) = (c.mnt(2), c.mnt(3));
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = format!("write {k}\n").repeat(1000);
                let name = format!("w{}", k % 16);
                {
                    use std::io::Write;
                    let mut f = fs::File::create(m2.join(&name)).unwrap();
                    f.write_all(body.as_bytes()).unwrap();
                    f.sync_all().unwrap();
                }
                assert_eq!(fs::read_to_string(m3.join(&name)).unwrap(), body);
                k += 1;
                done.store(k, Ordering::Relaxed);
            }
        })
    };

    // Strangers from four addresses, each connecting again and again for 8 s.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let taken: Vec<u64> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for k in 2..6 {
            let addr = c.addr(1);
            set.spawn(async move {
                let ep = stranger(&format!("127.0.0.{k}:0"), fingerprint);
                let mut most = 0;
                while started.elapsed() < Duration::from_secs(8) {
                    let mut round = tokio::task::JoinSet::new();
                    for _ in 0..4 {
                        let ep = ep.clone();
                        round.spawn(async move { attack(&ep, addr).await });
                    }
                    most = most.max(round.join_all().await.into_iter().max().unwrap_or(0));
                }
                most
            });
        }
        set.join_all().await
    });
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .expect("the cluster kept serving its own writes and reads");
    assert!(done.load(Ordering::Relaxed) > 0);

    // No stranger got more than the window a node gives before it knows who is calling.
    let most = taken.iter().copied().max().unwrap();
    assert!(
        most <= shoal_net::quic::UNAUTHENTICATED_WINDOW as u64,
        "a stranger had {most} bytes taken"
    );
    let grown = rss(leader_pid).saturating_sub(before);
    eprintln!(
        "strangers: at most {most} bytes taken from one; node 1 grew by {} KiB; {} writes and reads served meanwhile",
        grown >> 10,
        done.load(Ordering::Relaxed)
    );
    assert!(
        grown < 64 << 20,
        "the node grew by {} MiB under attack",
        grown >> 20
    );
    // A real join still works.
    let joined = Command::new(shoal())
        .args(["join", "--token", &token.to_string(), "--peer"])
        .arg(c.addr(1).to_string())
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(tempfile::tempdir().unwrap().path().join("data"))
        .output()
        .unwrap();
    assert!(joined.status.success(), "{joined:?}");
}

/// Calls node `to` of `c` as member `as_node`, with that node's own certificate.
fn call_as(
    c: &LocalCluster,
    as_node: u32,
    to: u32,
    req: shoal_fs::cluster::rpc::Request,
) -> shoal_fs::cluster::rpc::Response {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let id =
            shoal_net::pki::Identity::load(&shoal_fs::cluster::tls_dir(&c.data(as_node))).unwrap();
        let ep = shoal_net::quic::endpoint(&id, "127.0.0.1:0".parse().unwrap()).unwrap();
        shoal_net::rpc::Peers::new(ep)
            .call_within(c.addr(to), &req, Duration::from_secs(30))
            .await
            .unwrap()
    })
}

/// Every block file under a node's data directory: (id, path).
fn block_files(data: &std::path::Path) -> Vec<(shoal_raft::BlockId, std::path::PathBuf)> {
    let mut out = Vec::new();
    for dir in fs::read_dir(data.join("blocks")).unwrap() {
        let dir = dir.unwrap().path();
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        if name.len() != 2 {
            continue;
        }
        for f in fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            let hex = p.file_name().unwrap().to_str().unwrap();
            let bytes: [u8; 32] = hex::decode(hex).unwrap().try_into().unwrap();
            out.push((shoal_raft::BlockId(bytes), p));
        }
    }
    out
}

#[test]
fn a_members_word_about_blocks_is_checked_not_trusted() {
    use shoal_fs::cluster::rpc::{Request, Response};
    let c = LocalCluster::up(3);
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        use std::io::Write;
        let mut f = fs::File::create(c.mnt(1).join("f")).unwrap();
        f.write_all(&body).unwrap();
        f.sync_all().unwrap();
    }
    let (id, path) = block_files(&c.data(1))
        .into_iter()
        .next()
        .expect("node 1 holds the file's block");
    let quarantine = c.data(1).join("blocks").join("quarantine");

    // "I collected this garbage, drop your copy" about a block a file names: node 1 decides
    // by its own view, and keeps it.
    match call_as(&c, 2, 1, Request::DropGarbage { blocks: vec![id] }) {
        Response::DropGarbage(Ok(())) => {}
        other => panic!("DropGarbage: {other:?}"),
    }
    assert!(path.exists(), "a member's word deleted a referenced block");

    // A wrong length is the caller's mistake: an error, and the good copy stays where it is.
    for wrong in [0, 1, 2_999_999, 4 << 20, u32::MAX] {
        match call_as(
            &c,
            2,
            1,
            Request::GetBlock {
                id,
                len: Some(wrong),
            },
        ) {
            Response::GetBlock(Err(e)) => assert!(e.to_string().contains("bytes here"), "{e}"),
            other => panic!("GetBlock with len {wrong}: {other:?}"),
        }
    }
    assert!(path.exists(), "a wrong length moved a good block away");
    assert_eq!(fs::read_dir(&quarantine).unwrap().count(), 0);
    match call_as(&c, 2, 1, Request::GetBlock { id, len: None }) {
        Response::GetBlock(Ok(data)) => assert_eq!(shoal_raft::BlockId::of(&data), id),
        other => panic!("{other:?}"),
    }

    // A copy damaged on disk is not "held": another node must not drop its own on that word.
    match call_as(&c, 3, 1, Request::HasBlocks { ids: vec![id] }) {
        Response::HasBlocks(has) => assert_eq!(has, vec![true]),
        other => panic!("{other:?}"),
    }
    let mut bytes = fs::read(&path).unwrap();
    bytes[1000] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    match call_as(&c, 3, 1, Request::HasBlocks { ids: vec![id] }) {
        Response::HasBlocks(has) => assert_eq!(has, vec![false], "a damaged copy was vouched for"),
        other => panic!("{other:?}"),
    }
    assert!(!path.exists(), "the damaged copy is quarantined");
    // The file still reads back whole from the other copies.
    crate::testkit::Daemon::drop_caches();
    assert_eq!(fs::read(c.mnt(1).join("f")).unwrap(), body);
}

/// Writes and fsyncs files on node `k` and reads what the other writers wrote, until `stop`;
/// returns how many rounds it did. Any error fails the test.
fn writer(c: &LocalCluster, k: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let mnts: Vec<_> = (1..=3).map(|n| c.mnt(n)).collect();
    std::thread::spawn(move || {
        use std::io::Write;
        let mine = &mnts[k as usize - 1];
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("w{k}-{round}");
            let body = format!("{name}\n").repeat(2000);
            let mut f = fs::File::create(mine.join(&name))
                .unwrap_or_else(|e| panic!("node {k} create {name}: {e}"));
            f.write_all(body.as_bytes()).unwrap();
            f.sync_all()
                .unwrap_or_else(|e| panic!("node {k} fsync {name}: {e}"));
            round += 1;
        }
        round
    })
}

#[test]
fn the_ca_is_rotated_under_load_with_a_node_down_and_the_old_one_retired() {
    use shoal_net::pki::{CertificateDer, Identity};
    let c = LocalCluster::up(3);
    let tls = |k| shoal_fs::cluster::tls_dir(&c.data(k));
    let old_token = fs::read_to_string(tls(1).join("join-token"))
        .unwrap()
        .trim()
        .to_string();
    let old_identity = Identity::load(&tls(3)).unwrap();
    let old_ca = old_identity.ca.clone();

    // Writers on nodes 1 and 2 all along; node 3 is down when the rotation starts.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [writer(&c, 1, stop.clone()), writer(&c, 2, stop.clone())];
    c.kill9(3);
    let out = c.shoal_at(1, &["ca", "rotate"]);
    assert!(out.status.success(), "{out:?}");
    let new_token = text(&out.stdout);
    assert_ne!(new_token, old_token);
    assert!(text(&out.stderr).contains("shoal ca retire"), "{out:?}");
    let again = c.shoal_at(1, &["ca", "rotate"]);
    assert!(
        !again.status.success() && text(&again.stderr).contains("already under way"),
        "{again:?}"
    );
    let on_node_2 = c.shoal_at(2, &["ca", "rotate"]);
    assert!(
        !on_node_2.status.success() && text(&on_node_2.stderr).contains("holds the CA"),
        "{on_node_2:?}"
    );

    // Nodes 1 and 2 move to the new CA within seconds; retiring the old one is refused while
    // node 3, down, still has a certificate from it, and says which node holds it back.
    let mut refusal = String::new();
    crate::cluster::eventually_within(
        "only node 3 holds the retirement back",
        Duration::from_secs(30),
        || {
            let out = c.shoal_at(1, &["ca", "retire"]);
            assert!(!out.status.success(), "retired with node 3 down: {out:?}");
            refusal = text(&out.stderr);
            refusal.contains("node 3") && !refusal.contains("node 2") && !refusal.contains("node 1")
        },
    );
    assert!(refusal.contains("shoal node rm"), "{refusal}");
    let node_2 = Identity::load(&tls(2)).unwrap();
    assert_ne!(
        node_2.ca, old_ca,
        "node 2 has a certificate from the new CA"
    );
    assert!(node_2.cross.is_some() && node_2.trust.len() == 2);

    // Node 3 comes back with its old certificate, is let in (the old CA is still trusted),
    // catches up and moves to the new CA by itself; then the old CA is retired.
    c.local_up(3);
    crate::cluster::eventually_within("the old CA is retired", Duration::from_secs(30), || {
        c.shoal_at(1, &["ca", "retire"]).status.success()
    });
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(rounds.iter().all(|r| *r > 0), "{rounds:?}");
    eprintln!(
        "rotation: writes+fsyncs on nodes 1 and 2 meanwhile: {rounds:?}; refusal while node 3 was down: {refusal}"
    );
    let new_ca: CertificateDer<'static> = Identity::load(&tls(3)).unwrap().ca;
    assert_ne!(new_ca, old_ca);
    crate::cluster::eventually("every node trusts the new CA alone", || {
        (1..=3).all(|k| Identity::load(&tls(k)).is_ok_and(|id| id.trust == vec![new_ca.clone()]))
    });

    // Every fsynced file is on every node, whole.
    for k in [1, 2] {
        for r in 0..rounds[k as usize - 1] {
            let name = format!("w{k}-{r}");
            let want = format!("{name}\n").repeat(2000);
            for n in 1..=3 {
                assert_eq!(
                    fs::read_to_string(c.mnt(n).join(&name)).unwrap(),
                    want,
                    "{name} on node {n}"
                );
            }
        }
    }

    // The old certificate no longer gets in, even trusting both CAs itself.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stale = old_identity.with_trust(vec![old_ca.clone(), new_ca.clone()]);
    let refused = rt.block_on(async {
        let ep = shoal_net::quic::endpoint(&stale, "127.0.0.1:0".parse().unwrap()).unwrap();
        shoal_net::rpc::Peers::new(ep)
            .call::<_, shoal_fs::cluster::rpc::Response>(
                c.addr(1),
                &shoal_fs::cluster::rpc::Request::ReadIndex,
            )
            .await
    });
    assert!(refused.is_err(), "{refused:?}");
    // The old token is refused; the new one joins.
    let join = |token: &str| {
        Command::new(shoal())
            .args(["join", "--token", token, "--peer"])
            .arg(c.addr(1).to_string())
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(tempfile::tempdir().unwrap().path().join("data"))
            .output()
            .unwrap()
    };
    let out = join(&old_token);
    assert!(!out.status.success(), "{out:?}");
    let out = join(&new_token);
    assert!(out.status.success(), "{out:?}");

    // A restarted node comes back under the new CA from its own files.
    c.kill9(2);
    c.local_up(3);
    fs::write(c.mnt(2).join("after"), b"restarted").unwrap();
    crate::cluster::eventually("node 1 reads node 2's write", || {
        fs::read(c.mnt(1).join("after")).is_ok_and(|b| b == b"restarted")
    });
}
