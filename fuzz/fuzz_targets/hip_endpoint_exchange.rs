//! The state machine under a fuzzer-chosen schedule: two endpoints exchange packets while
//! the input decides which packets are dropped, duplicated, delayed or bit-flipped, when
//! time advances, and which commands (initiate, close, rekey, locator update) are issued.
//! Nothing may panic, and whenever both sides report an established association their
//! SPIs and keys must mirror each other.
#![no_main]

use std::{
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use hip_proto::{
    Algorithm, HostIdentity,
    endpoint::{Config, Endpoint, Event, SequentialSpis, Transmit},
};
use libfuzzer_sys::fuzz_target;
use rand_core::SeedableRng;

fn pems() -> &'static (String, String) {
    static P: OnceLock<(String, String)> = OnceLock::new();
    P.get_or_init(|| {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let a = HostIdentity::generate(Algorithm::Ed25519, &mut rng).unwrap();
        let b = HostIdentity::generate(Algorithm::Ed25519, &mut rng).unwrap();
        (a.to_pkcs8_pem().unwrap(), b.to_pkcs8_pem().unwrap())
    })
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let (pa, pb) = pems();
    let now0 = Instant::now();
    let config = Config {
        puzzle_difficulty: 1,
        dh_groups: vec![hip_proto::crypto::DhGroup::NistP256],
        ..Config::default()
    };
    let mk = |pem: &str, seed: u64, spi: u32| {
        let mut e = Endpoint::new(
            config.clone(),
            HostIdentity::from_pkcs8_pem(pem).unwrap(),
            Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed)),
            now0,
        )
        .unwrap();
        e.set_spi_allocator(Box::new(SequentialSpis(spi)));
        e
    };
    let mut eps = [mk(pa, 1, 0x1000), mk(pb, 2, 0x2000)];
    let locs = [addr("2001:db8::a"), addr("2001:db8::b")];
    let hits = [eps[0].hit(), eps[1].hit()];
    let mut now = now0;
    let mut inflight: Vec<(usize, Transmit)> = Vec::new();
    let mut established: [Option<Box<hip_proto::endpoint::Established>>; 2] = [None, None];
    let _ = eps[0].initiate(now, locs[0], locs[1], Some(hits[1]));
    for op in data.chunks(2).take(400) {
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
