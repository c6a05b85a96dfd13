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

/// A node that answers `Ping(n)` with `Pong { n + 1, peer }`.
fn serve(id: &Identity) -> (quinn::Endpoint, SocketAddr) {
    let ep = quic::endpoint(id, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                rpc::serve(conn, |peer, Ping(n)| async move { Pong { n: n + 1, peer } }).await;
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
