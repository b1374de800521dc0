//! Resource release, alone in its own test binary so that no other test opens or closes file
//! descriptors in this process while it counts them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// 500 sequential open/transfer/close cycles over one connection release everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_cycles_leak_nothing() {
    let echo = echo_server().await;
    let pair = pair()
        .service("echo", echo.addr)
        .session(|s| s.idle_grace = Duration::from_secs(600))
        .build();
    let local = pair.local("echo").await;
    // Warm up: the connection and its lazily made resources exist before counting.
    echo_round_trip(local, b"warm up").await;
    assert!(
        pair.client
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await
    );
    assert!(
        pair.server
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await
    );
    assert!(echo.live.wait_for(WAIT, |n| *n == 0).await);
    let fds_before = open_fds();
    let data = Arc::new(random_bytes(4096));
    for _ in 0..500 {
        echo_round_trip(local, &data).await;
    }
    assert!(
        pair.client
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "client streams"
    );
    assert!(
        pair.server
            .stats()
            .streams
            .wait_for(WAIT, |n| *n == 0)
            .await,
        "server streams"
    );
    assert!(
        echo.live.wait_for(WAIT, |n| *n == 0).await,
        "target connections"
    );
    assert_eq!(open_fds(), fds_before, "file descriptors");
    assert_eq!(pair.client.stats().connections_opened(), 1);
    assert_eq!(pair.client.stats().streams_opened(), 501);
    assert_eq!(pair.server.stats().streams_opened(), 501);
    pair.shutdown().await;
}
