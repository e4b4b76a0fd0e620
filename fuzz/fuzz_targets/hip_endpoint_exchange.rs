//! The state machine under a fuzzer-chosen schedule: two endpoints exchange packets while
//! the input decides which packets are dropped, duplicated, delayed or bit-flipped, when
//! time advances, and which commands (initiate, close, rekey, locator update) are issued.
//! Nothing may panic, and whenever both sides report an established association their
//! SPIs and keys must mirror each other.
//!
//! Kept fast (the exchange's signatures and DH dominate an execution): the endpoints are
//! built once and reset to their snapshot for every input (building them — R1 pool, key
//! parsing — was two thirds of an execution), Ed25519 identities, the cheapest DH group
//! (P-256), a one-entry R1 pool, puzzle K = 1, and at
//! most [`MAX_OPS`] steps per input (longer inputs are skipped: run with
//! `-max_len=128`), which is enough for an exchange, a rekey, a locator update and a close.
#![no_main]

use std::{
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hip_proto::{
    Algorithm, HostIdentity,
    endpoint::{Config, Endpoint, Event, SequentialSpis, Snapshot, Transmit},
};
use libfuzzer_sys::fuzz_target;
use rand_core::SeedableRng;

/// The two endpoints, built once (their R1 pools cost signatures and DH keys), and what
/// [`Endpoint::reset`] returns them to before every input: each run starts from the same
/// state at the same instant with the same RNG seeds, so an input replays exactly.
struct Pair {
    eps: [Endpoint; 2],
    snaps: [Snapshot; 2],
    now0: Instant,
}

static PAIR: Mutex<Option<Pair>> = Mutex::new(None);

fn build() -> Pair {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    let now0 = Instant::now();
    let config = Config {
        puzzle_difficulty: 1,
        dh_groups: vec![hip_proto::crypto::DhGroup::NistP256],
        r1_pool_size: 1,
        ..Config::default()
    };
    let mut mk = |seed: u64| {
        let id = HostIdentity::generate(Algorithm::Ed25519, &mut rng).unwrap();
        Endpoint::new(
            config.clone(),
            id,
            Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed)),
            now0,
        )
        .unwrap()
    };
    let eps = [mk(1), mk(2)];
    let snaps = [eps[0].snapshot(), eps[1].snapshot()];
    Pair { eps, snaps, now0 }
}

/// Steps per input (two bytes each).
const MAX_OPS: usize = 64;

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 2 * MAX_OPS {
        return;
    }
    let mut guard = PAIR.lock().unwrap();
    let pair = guard.get_or_insert_with(build);
    for (i, ep) in pair.eps.iter_mut().enumerate() {
        ep.reset(
            &pair.snaps[i],
            Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(10 + i as u64)),
        );
        ep.set_spi_allocator(Box::new(SequentialSpis(0x1000 * (i as u32 + 1))));
    }
    let now0 = pair.now0;
    let eps = &mut pair.eps;
    let locs = [addr("2001:db8::a"), addr("2001:db8::b")];
    let hits = [eps[0].hit(), eps[1].hit()];
    let mut now = now0;
    let mut inflight: Vec<(usize, Transmit)> = Vec::new();
    let mut established: [Option<Box<hip_proto::endpoint::Established>>; 2] = [None, None];
    let _ = eps[0].initiate(now, locs[0], locs[1], Some(hits[1]));
    for op in data.chunks(2) {
        let (code, arg) = (op[0], op.get(1).copied().unwrap_or(0));
        for (i, ep) in eps.iter_mut().enumerate() {
            while let Some(t) = ep.poll_transmit() {
                inflight.push((1 - i, t));
            }
            while let Some(e) = ep.poll_event() {
                if let Event::Established(x) = e {
                    established[i] = Some(x);
                }
            }
        }
        if let [Some(a), Some(b)] = &established
            && a.peer_hit == b.local_hit
            && a.spi_outbound == b.spi_inbound
        {
            assert_eq!(a.keys_outbound, b.keys_inbound);
        }
        let pick = |n: usize| if n == 0 { 0 } else { arg as usize % n };
        match code % 10 {
            // Deliver a packet (the most common step).
            0..=3 if !inflight.is_empty() => {
                let (to, t) = inflight.remove(pick(inflight.len()));
                let _ = eps[to].handle_packet(now, t.src, t.dst, &t.payload);
            }
            4 if !inflight.is_empty() => {
                // Duplicate.
                let k = pick(inflight.len());
                let c = inflight[k].clone();
                inflight.push(c);
            }
            5 if !inflight.is_empty() => {
                // Drop.
                inflight.remove(pick(inflight.len()));
            }
            6 if !inflight.is_empty() => {
                // Flip a bit and deliver (with the checksum made right again).
                let (to, mut t) = inflight.remove(pick(inflight.len()));
                let n = t.payload.len();
                t.payload[(arg as usize * 7) % n] ^= 1 << (arg % 8);
                hip_proto::wire::set_checksum(&mut t.payload, t.src, t.dst);
                let _ = eps[to].handle_packet(now, t.src, t.dst, &t.payload);
            }
            7 => {
                now += Duration::from_millis(250 * (arg as u64 % 80 + 1));
                for ep in eps.iter_mut() {
                    ep.handle_timeout(now);
                }
            }
            8 => {
                let i = (arg & 1) as usize;
                let _ = match arg >> 1 & 3 {
                    0 => eps[i].initiate(now, locs[i], locs[1 - i], Some(hits[1 - i])),
                    1 => eps[i].close(now, hits[1 - i]),
                    2 => eps[i].rekey(now, hits[1 - i]),
                    _ => eps[i].rekey_with_new_dh(now, hits[1 - i]),
                };
            }
            9 => {
                let i = (arg & 1) as usize;
                let _ = eps[i].update_locators(now, hits[1 - i], addr("2001:db8::c"));
            }
            _ => {}
        }
    }
});
