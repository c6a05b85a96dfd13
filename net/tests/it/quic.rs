use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_net::pki::{Ca, Identity, PendingIdentity};
use shoal_net::{quic, rpc};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Ping(u32);

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Pong {
    n: u32,
    peer: Option<u64>,
}

fn identity(ca: &Ca, node: u64) -> Identity {
    let p = PendingIdentity::generate().unwrap();
    let cert = ca
        .sign(&p.csr_der, node, Duration::from_secs(3600))
        .unwrap();
    p.complete(cert, ca.cert.clone()).unwrap()
}

/// What the test servers allow: members 80 MiB, strangers 16 KiB.
fn limits() -> rpc::Limits {
    rpc::Limits::new(|member, _| if member { 80 << 20 } else { 16 << 10 })
}

/// A node that answers `Ping(n)` with `Pong { n + 1, peer }`.
fn serve(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
    serve_with(id, limits())
}

fn serve_with(id: &Identity, limits: rpc::Limits) -> (quinn::Endpoint, SocketAddr) {
    let limits = std::sync::Arc::new(limits);
    let ep = quic::endpoint(id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            let limits = limits.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                rpc::serve(conn, limits.clone(), |peer, Ping(n)| async move {
                    Pong { n: n + 1, peer }
                })
                .await;
            });
        }
    });
    (ep, addr)
}

#[tokio::test]
async fn members_talk_and_see_each_others_node_ids() {
    let ca = Ca::generate("c1").unwrap();
    let (_server, addr) = serve(&identity(&ca, 1));
    let client = quic::endpoint(&identity(&ca, 2), "127.0.0.1:0".parse().unwrap()).unwrap();
    let peers = rpc::Peers::new(client);
    let pong: Pong = peers.call(addr, &Ping(41)).await.unwrap();
    assert_eq!(
        pong,
        Pong {
            n: 42,
            peer: Some(2)
        }
    );
    // The connection is reused.
    let pong: Pong = peers.call(addr, &Ping(1)).await.unwrap();
    assert_eq!(pong.n, 2);
}

#[tokio::test]
async fn a_node_of_another_cluster_is_refused() {
    let ca = Ca::generate("c1").unwrap();
    let other = Ca::generate("c2").unwrap();
    let (_server, addr) = serve(&identity(&ca, 1));
    let stranger = quic::endpoint(&identity(&other, 2), "127.0.0.1:0".parse().unwrap()).unwrap();
    let err = rpc::Peers::new(stranger)
        .call::<_, Pong>(addr, &Ping(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_joining_node_checks_the_ca_fingerprint_and_is_unauthenticated() {
    let ca = Ca::generate("c1").unwrap();
    let (_server, addr) = serve(&identity(&ca, 1));
    let joiner = quic::join_endpoint(ca.fingerprint()).unwrap();
    let pong: Pong = rpc::Peers::new(joiner).call(addr, &Ping(0)).await.unwrap();
    assert_eq!(
        pong.peer, None,
        "a node without a certificate is not a member"
    );

    let wrong = quic::join_endpoint([0u8; 32]).unwrap();
    let err = rpc::Peers::new(wrong)
        .call::<_, Pong>(addr, &Ping(0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
}

/// Writes raw bytes on a new stream of `conn`: a frame header claiming `len` bytes, then `body`,
/// and reports how the write ended.
async fn send_raw(conn: &quinn::Connection, len: u32, body: &[u8]) -> Result<(), String> {
    let written = async {
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&len.to_be_bytes()).await?;
        send.write_all(body).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    written.await.map_err(|e| match conn.close_reason() {
        Some(why) => why.to_string(),
        None => e.to_string(),
    })
}

#[tokio::test]
async fn a_stranger_cannot_make_a_node_buffer_big_frames_and_members_go_on() {
    let ca = Ca::generate("c1").unwrap();
    let (_server, addr) = serve(&identity(&ca, 1));
    let stranger = quic::join_endpoint(ca.fingerprint()).unwrap();
    let conn = quic::connect(&stranger, addr).await.unwrap();
    // An 80 MiB frame, then 8 MiB of it: the node reads the head, sees the size is not one a
    // stranger may send, and closes the connection. The stranger can never have more than the
    // 64 KiB window in flight, so the write stalls and then fails: it is never all taken.
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        send_raw(&conn, 80 << 20, &vec![0u8; 8 << 20]),
    )
    .await
    .expect("the node closed the connection instead of waiting for the rest");
    let err = sent.unwrap_err();
    assert!(err.contains("request too large"), "{err}");

    // A member meanwhile, and after, is served, big requests included.
    let member =
        rpc::Peers::new(quic::endpoint(&identity(&ca, 2), "127.0.0.1:0".parse().unwrap()).unwrap());
    let pong: Pong = member.call(addr, &Ping(1)).await.unwrap();
    assert_eq!(pong.n, 2);
    let member_conn = quic::connect(member.endpoint().unwrap(), addr)
        .await
        .unwrap();
    // 8 MiB of garbage postcard from a member goes through the window (it is then malformed,
    // which closes only that stream).
    tokio::time::timeout(
        Duration::from_secs(10),
        send_raw(&member_conn, 8 << 20, &vec![0xff; 8 << 20]),
    )
    .await
    .expect("a member's big request is taken")
    .unwrap();
}

#[tokio::test]
async fn a_stranger_that_stalls_is_cut_off_and_one_that_floods_is_turned_away() {
    let ca = Ca::generate("c1").unwrap();
    let mut limits = limits();
    limits.unauthenticated_lifetime = Duration::from_secs(1);
    limits.unauthenticated_per_second = 3;
    let (_server, addr) = serve_with(&identity(&ca, 1), limits);
    let stranger = quic::join_endpoint(ca.fingerprint()).unwrap();

    // Half a frame, then nothing: the connection is closed when its time is up.
    let conn = quic::connect(&stranger, addr).await.unwrap();
    send_raw(&conn, 1000, &[0u8; 10]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("a stalled stranger is cut off within its lifetime");
    assert!(closed.to_string().contains("time is up"), "{closed}");

    // Connections without a certificate: a few a second from one address, the rest refused
    // with a close that says to try again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut busy = 0;
    let mut served = 0;
    for _ in 0..8 {
        let peers = rpc::Peers::new(quic::join_endpoint(ca.fingerprint()).unwrap());
        match peers.call::<_, Pong>(addr, &Ping(0)).await {
            Ok(p) => {
                assert_eq!(p.peer, None);
                served += 1;
            }
            Err(e) if e.is_busy() => busy += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert!(served >= 3 && busy >= 1, "served {served}, busy {busy}");
    // A second later, strangers get in again; members never were limited.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let peers = rpc::Peers::new(quic::join_endpoint(ca.fingerprint()).unwrap());
    peers.call::<_, Pong>(addr, &Ping(0)).await.unwrap();
}

/// A node of `ca` that trusts `trust`, with `cross` after its certificate if given.
fn identity_of(
    ca: &Ca,
    node: u64,
    cross: Option<&quinn::rustls::pki_types::CertificateDer<'static>>,
    trust: &[&Ca],
) -> Identity {
    let mut id = identity(ca, node);
    id.cross = cross.cloned();
    id.with_trust(trust.iter().map(|c| c.cert.clone()).collect())
}

#[tokio::test]
async fn during_a_ca_rotation_old_and_new_certificates_meet_and_after_it_the_old_are_refused() {
    let old = Ca::generate("c1").unwrap();
    let new = old.successor("c1").unwrap();
    let cross = old.cross_sign(&new).unwrap();
    // Node 1 has not heard of the rotation: old certificate, trusts the old CA only.
    let (_n1, a1) = serve(&identity_of(&old, 1, None, &[&old]));
    // Node 2 is in the middle of it: a new certificate, trusts both.
    let n2 = identity_of(&new, 2, Some(&cross), &[&new, &old]);
    let (_n2, a2) = serve(&n2);
    // Node 3 is past it: the old CA is retired.
    let n3 = identity_of(&new, 3, Some(&cross), &[&new]);
    let (_n3, a3) = serve(&n3);

    let client = |id: &Identity| {
        rpc::Peers::new(quic::endpoint(id, "127.0.0.1:0".parse().unwrap()).unwrap())
    };
    // A new certificate reaches a node that trusts only the old CA through the cross-signed CA.
    let pong: Pong = client(&n2).call(a1, &Ping(1)).await.unwrap();
    assert_eq!(pong.peer, Some(2));
    // An old certificate is accepted where both CAs are trusted...
    let pong: Pong = client(&identity_of(&old, 1, None, &[&old, &new]))
        .call(a2, &Ping(1))
        .await
        .unwrap();
    assert_eq!(pong.peer, Some(1));
    // ...and refused once the old CA is retired, both ways.
    // (A client certificate is checked after the client's side of the handshake is done: the
    // refusal shows as a lost connection.)
    let refused = client(&identity_of(&old, 1, None, &[&old, &new]))
        .call::<_, Pong>(a3, &Ping(1))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let err = client(&n3).call::<_, Pong>(a1, &Ping(1)).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    let pong: Pong = client(&n3).call(a2, &Ping(1)).await.unwrap();
    assert_eq!(pong.peer, Some(3));
    // A joining node with the new CA's fingerprint finds it in node 2's and node 3's chains.
    for addr in [a2, a3] {
        let joiner = rpc::Peers::new(quic::join_endpoint(new.fingerprint()).unwrap());
        let pong: Pong = joiner.call(addr, &Ping(0)).await.unwrap();
        assert_eq!(pong.peer, None);
    }
}
