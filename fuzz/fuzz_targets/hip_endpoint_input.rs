//! The state machine's packet input: arbitrary bytes (with the checksum fixed up, so the
//! fuzzer gets past it) to an endpoint that is both a responder and an initiator in
//! I1-SENT. Nothing may panic, and a packet that is refused must not change the number
//! of associations.
#![no_main]

use std::{
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hip_proto::{
    Algorithm, Hit, HostIdentity,
    endpoint::{Config, Endpoint, Snapshot},
    wire,
};
use libfuzzer_sys::fuzz_target;
use rand_core::SeedableRng;

struct State {
    ep: Endpoint,
    /// The endpoint right after it was built, to return to (building it again costs
    /// two key generations and the R1 pool's signatures).
    snap: Snapshot,
    peer: Hit,
    now0: Instant,
    now: Instant,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn build() -> State {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let id = HostIdentity::generate(Algorithm::EcdsaP256, &mut rng).unwrap();
    let peer = HostIdentity::generate(Algorithm::EcdsaP256, &mut rng).unwrap();
    let now = Instant::now();
    let config = Config {
        puzzle_difficulty: 1,
        max_puzzle_difficulty: 8,
        puzzle_max_attempts: 1 << 12,
        ..Config::default()
    };
    let ep = Endpoint::new(config, id, Box::new(rng), now).unwrap();
    let snap = ep.snapshot();
    let mut st = State {
        ep,
        snap,
        peer: peer.hit(),
        now0: now,
        now,
    };
    fresh(&mut st);
    st
}

/// Back to the built endpoint, in I1-SENT towards the peer, at the first instant.
fn fresh(st: &mut State) {
    st.ep.reset(
        &st.snap,
        Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(2)),
    );
    st.now = st.now0;
    st.ep
        .initiate(
            st.now,
            addr("2001:db8::1"),
            addr("2001:db8::2"),
            Some(st.peer),
        )
        .unwrap();
    while st.ep.poll_transmit().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    let mut guard = STATE.lock().unwrap();
    let st = guard.get_or_insert_with(build);
    let (src, dst) = if data.first().is_some_and(|b| b & 1 == 1) {
        (addr("192.0.2.2"), addr("192.0.2.1"))
    } else {
        (addr("2001:db8::2"), addr("2001:db8::1"))
    };
    let mut pkt = data.get(1..).unwrap_or_default().to_vec();
    wire::set_checksum(&mut pkt, src, dst);
    let before = st.ep.association_count();
    st.now += Duration::from_millis(10);
    let now = st.now;
    if st.ep.handle_packet(now, src, dst, &pkt).is_err() {
        assert_eq!(st.ep.association_count(), before);
    }
    while st.ep.poll_transmit().is_some() {}
    while st.ep.poll_event().is_some() {}
    st.ep.handle_timeout(now);
    // Start over now and then so that the I1-SENT association is there again.
    if st.ep.association_count() == 0 || data.len() % 251 == 0 {
        fresh(st);
    }
});
