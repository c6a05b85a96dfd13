//! The in-memory network the simulation tests run on: its faults do what they say.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use shoal_net::memory::{Fault, MemoryNetwork, Rule};
use shoal_net::rpc::{Peers, RpcError};

fn addr(k: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, k], 7000))
}

/// Serves node `k`: answers each request (a u32) with the caller's id and the request, and
/// counts the requests it handled.
fn serve(net: &MemoryNetwork, k: u8) -> Arc<AtomicU64> {
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    net.serve(
        addr(k),
        u64::from(k),
        Arc::new(move |from, req| {
            let h = h.clone();
            Box::pin(async move {
                h.fetch_add(1, Ordering::SeqCst);
                let n: u32 = postcard::from_bytes(&req).unwrap();
                postcard::to_stdvec(&(from, n)).unwrap()
            })
        }),
    );
    handled
}

async fn call(peers: &Peers, k: u8, n: u32) -> Result<(Option<u64>, u32), RpcError> {
    peers
        .call_within(addr(k), &n, Duration::from_millis(200))
        .await
}

#[tokio::test]
async fn calls_arrive_with_the_callers_id_and_faults_apply_per_direction() {
    let net = MemoryNetwork::new(7);
    let handled2 = serve(&net, 2);
    let handled1 = serve(&net, 1);
    let from1 = Peers::over(net.port(Some(1)));
    let from2 = Peers::over(net.port(Some(2)));
    let stranger = Peers::over(net.port(None));
    assert_eq!(call(&from1, 2, 5).await.unwrap(), (Some(1), 5));
    assert_eq!(call(&stranger, 2, 6).await.unwrap(), (None, 6));

    // One way: 1 -> 2 is cut, 2 -> 1 still works.
    net.partition(&[1], &[2], true);
    assert!(matches!(
        call(&from1, 2, 7).await,
        Err(RpcError::Timeout(_))
    ));
    assert_eq!(
        handled2.load(Ordering::SeqCst),
        2,
        "a lost request is not handled"
    );
    assert_eq!(call(&from2, 1, 8).await.unwrap(), (Some(2), 8));
    net.heal();
    // The caller marked node 2 down after its timeout, for a moment.
    assert!(matches!(call(&from1, 2, 9).await, Err(RpcError::Down(_))));

    // A lost answer: handled, yet the caller times out.
    net.add(Rule {
        from: Some(2),
        to: Some(1),
        kind: None,
        fault: Fault::DropReply { percent: 100 },
    });
    let before = handled1.load(Ordering::SeqCst);
    assert!(matches!(
        call(&from2, 1, 10).await,
        Err(RpcError::Timeout(_))
    ));
    assert_eq!(handled1.load(Ordering::SeqCst), before + 1);
    net.heal();

    // Duplicates: handled twice, answered once.
    let stranger_dup = Peers::over(net.port(Some(3)));
    net.add(Rule {
        from: Some(3),
        to: None,
        kind: None,
        fault: Fault::Duplicate { percent: 100 },
    });
    let before = handled1.load(Ordering::SeqCst);
    assert_eq!(call(&stranger_dup, 1, 11).await.unwrap(), (Some(3), 11));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handled1.load(Ordering::SeqCst), before + 2);

    // A stopped node answers nothing.
    net.stop(addr(1));
    let third = Peers::over(net.port(Some(4)));
    assert!(matches!(
        call(&third, 1, 12).await,
        Err(RpcError::Timeout(_))
    ));
    let stats = net.stats();
    assert_eq!(stats.dropped, 1);
    assert_eq!(stats.replies_dropped, 1);
    assert_eq!(stats.duplicated, 1);
}

#[tokio::test]
async fn a_seed_draws_the_same_losses_for_the_same_calls() {
    async fn losses(seed: u64) -> Vec<bool> {
        let net = MemoryNetwork::new(seed);
        serve(&net, 2);
        net.add(Rule {
            from: None,
            to: None,
            kind: None,
            fault: Fault::Drop { percent: 50 },
        });
        let port = net.port(Some(1));
        let mut out = Vec::new();
        for n in 0..40u32 {
            // A fresh `Peers` each time, so a loss does not mark node 2 down for the next.
            let peers = Peers::over(port.clone());
            let r = peers
                .call_within::<_, (Option<u64>, u32)>(addr(2), &n, Duration::from_millis(20))
                .await;
            out.push(r.is_err());
        }
        out
    }
    let a = losses(42).await;
    assert_eq!(a, losses(42).await);
    assert_ne!(a, losses(43).await);
    assert!(a.iter().any(|l| *l) && a.iter().any(|l| !*l));
}
