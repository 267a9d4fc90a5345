//! A real gateway holds its peer channels without a thread per peer: 10 and then 50
//! identity peers (half dialing it, half dialed by it) all come up, and the gateway's
//! thread count is the same small number either way.

use isthmus_e2e::channel_scale::{ChannelScale, ScaleOptions};

/// Threads of the gateway that do not depend on the number of peers leave this much room
/// (e.g. an admin connection being served while we look).
const THREAD_SLACK: u64 = 2;

#[test]
fn gateway_threads_do_not_grow_with_peer_channels() {
    // One namespace for both rounds: this process's channel runtime lives in it.
    let scale = ChannelScale::new().expect("namespace");
    let mut small = ScaleOptions::new(10);
    small.port = 7443;
    let mut large = ScaleOptions::new(50);
    large.port = 7444;
    let r10 = scale.round(&small).expect("10 peer channels");
    let r50 = scale.round(&large).expect("50 peer channels");
    for r in [&r10, &r50] {
        assert_eq!(r.sessions, r.peers as u64, "no session flapped: {r:?}");
        assert!(r.dialed_by_peers > 0 && r.dialed_by_gateway > 0, "{r:?}");
        assert!(
            r.after.threads <= r.before.threads + THREAD_SLACK,
            "threads grew with sessions: {r:?}"
        );
        assert!(r.after.threads < 40, "a few dozen threads at most: {r:?}");
    }
    assert!(
        r50.after.threads <= r10.after.threads + THREAD_SLACK,
        "10 peers: {} threads, 50 peers: {} threads",
        r10.after.threads,
        r50.after.threads
    );
}
