//! Benchmarks of the protocol core, reported as ratios against baselines measured in the
//! same run (called by `hip-proto-bench`, which `cargo xtask bench` runs).
//!
//! * `exchange_vs_crypto_floor`: the mean time of a complete base exchange between two
//!   in-process endpoints (I1 → R1 → I2 → R2, both sides up to `Established`), and the sum
//!   of the same exchange's cryptographic operations timed alone (signatures, signature
//!   checks, DH key generation and agreements, HIP-KDF, the puzzle, HMACs, the ENCRYPTED
//!   cipher). The ratio is the protocol's own overhead; the goal is ≤ 1.3.
//! * `r1_rate`: R1 answers per second from the precomputed pool (I1 parsed, checksum
//!   checked, R1 filled in and checksummed) against signing a fresh R1 per I1.
//!
//! Timing happens here, never in the protocol core, which takes time as an input.

use std::{
    hint::black_box,
    net::IpAddr,
    time::{Duration, Instant},
};

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::{
    Algorithm, Hit, HostIdentity,
    crypto::{DhGroup, DhSecret, HipCipher, Keymat, Rhash, puzzle},
    endpoint::{Config, Endpoint, Event},
    wire::{self, PacketBuilder, PacketType, Param},
};

/// Result of [`exchange_vs_crypto_floor`].
#[derive(Clone, Debug)]
pub struct ExchangeReport {
    /// HI algorithm of both peers.
    pub algorithm: Algorithm,
    /// DH group.
    pub dh_group: DhGroup,
    /// Puzzle difficulty.
    pub puzzle_k: u8,
    /// Exchanges measured.
    pub iterations: u32,
    /// Median time of one complete exchange.
    pub exchange: Duration,
    /// Median time of the exchange's crypto operations run alone.
    pub crypto_floor: Duration,
}

impl ExchangeReport {
    /// exchange / floor.
    pub fn ratio(&self) -> f64 {
        self.exchange.as_secs_f64() / self.crypto_floor.as_secs_f64()
    }
}

fn loc(s: &str) -> IpAddr {
    s.parse().expect("literal")
}

fn identity(alg: Algorithm, seed: u64) -> HostIdentity {
    HostIdentity::generate(alg, &mut ChaCha20Rng::seed_from_u64(seed)).expect("keygen")
}

fn config(group: DhGroup, k: u8) -> Config {
    Config {
        dh_groups: vec![group],
        hip_ciphers: vec![HipCipher::Aes128Cbc],
        puzzle_difficulty: k,
        // Every exchange comes from the same address at the same instant.
        r1_rate_per_address: u32::MAX,
        r1_burst_per_address: u32::MAX,
        ..Config::default()
    }
}

/// Drives one exchange to `Established` on both sides; panics if it does not complete
/// (a perfect in-memory link cannot lose packets).
fn one_exchange(a: &mut Endpoint, b: &mut Endpoint, now: Instant) {
    let hb = b.hit();
    a.initiate(now, loc("2001:db8::a"), loc("2001:db8::b"), Some(hb))
        .expect("initiate");
    let (mut da, mut db) = (false, false);
    for _ in 0..8 {
        while let Some(t) = a.poll_transmit() {
            let _ = b.handle_packet(now, t.src, t.dst, &t.payload);
        }
        while let Some(t) = b.poll_transmit() {
            let _ = a.handle_packet(now, t.src, t.dst, &t.payload);
        }
        while let Some(e) = a.poll_event() {
            da |= matches!(e, Event::Established(_));
        }
        while let Some(e) = b.poll_event() {
            db |= matches!(e, Event::Established(_));
        }
        if da && db {
            break;
        }
    }
    assert!(da && db, "exchange did not complete");
    debug_assert!(a.poll_transmit().is_none() && b.poll_transmit().is_none());
    let ha = a.hit();
    a.abort(hb).expect("association");
    b.abort(ha).expect("association");
}

/// Measures `iterations` exchanges and the same exchange's crypto floor.
pub fn exchange_vs_crypto_floor(
    alg: Algorithm,
    group: DhGroup,
    k: u8,
    iterations: u32,
) -> ExchangeReport {
    let now = Instant::now();
    let mut a = Endpoint::new(
        config(group, k),
        identity(alg, 1),
        Box::new(ChaCha20Rng::seed_from_u64(11)),
        now,
    )
    .expect("endpoint");
    let mut b = Endpoint::new(
        config(group, k),
        identity(alg, 2),
        Box::new(ChaCha20Rng::seed_from_u64(12)),
        now,
    )
    .expect("endpoint");
    one_exchange(&mut a, &mut b, now); // warm-up

    // The floor: each crypto operation of one exchange, alone, with the same inputs.
    let ida = identity(alg, 1);
    let idb = identity(alg, 2);
    let (ha, hb) = (ida.hit(), idb.hit());
    let rhash = Rhash::for_suite(idb.host_id().hit_suite()).expect("suite");
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let resp_dh = DhSecret::generate(group, &mut rng);
    // Precomputed with the R1 pool in the exchange, so outside the loop here too.
    let resp_pub = resp_dh.public_value();
    let msg = vec![0x5au8; 600];
    let i = vec![7u8; rhash.len()];
    let mut floor_once = || {
        // Signatures: I2 and R2 (the R1 was signed ahead of time, in the pool).
        let sig_b = idb.sign(&msg).expect("sign");
        let sig_a = ida.sign(&msg).expect("sign");
        // Checks: R1 and R2 by the initiator, I2 by the responder.
        idb.host_id().verify(&msg, &sig_b).expect("verify");
        idb.host_id().verify(&msg, &sig_b).expect("verify");
        ida.host_id().verify(&msg, &sig_a).expect("verify");
        // Puzzle: the initiator solves, the responder checks once; #I is computed once.
        let j = puzzle::solve(rhash, &i, ha, hb, k, u64::MAX, &mut rng).expect("solvable");
        black_box(puzzle::verify(rhash, &i, ha, hb, &j, k));
        black_box(rhash.hmac(&[1; 32], &msg[..34]));
        // DH: the initiator's key pair, one agreement on each side.
        let init_dh = DhSecret::generate(group, &mut rng);
        let kij = init_dh.agree(&resp_pub).expect("agree");
        black_box(resp_dh.agree(&init_dh.public_value()).expect("agree"));
        // HIP-KDF on both sides (HIP keys and ESP keys drawn).
        for _ in 0..2 {
            let km = Keymat::derive(rhash, &i, &j, &kij, ha, hb);
            black_box(km.draw(0, 2 * (16 + rhash.len())).expect("draw"));
            black_box(km.draw(2 * (16 + rhash.len()), 40).expect("draw"));
        }
        // ENCRYPTED: encrypt and decrypt the HOST_ID.
        let ct = HipCipher::Aes128Cbc.encrypt(&[3; 16], &msg[..120], &mut rng);
        black_box(
            HipCipher::Aes128Cbc
                .decrypt(&[3; 16], &ct)
                .expect("decrypt"),
        );
        // HMACs: I2 (make, check), R2's HMAC_2 (make, check).
        for _ in 0..4 {
            black_box(rhash.hmac(&[2; 48], &msg));
        }
    };
    floor_once(); // warm-up
    // Interleaved, so that load from other processes hits both alike; medians.
    let mut ex = Vec::with_capacity(iterations as usize);
    let mut fl = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t0 = Instant::now();
        one_exchange(&mut a, &mut b, now);
        ex.push(t0.elapsed());
        let t0 = Instant::now();
        floor_once();
        fl.push(t0.elapsed());
    }
    let exchange = median(&mut ex);
    let crypto_floor = median(&mut fl);
    ExchangeReport {
        algorithm: alg,
        dh_group: group,
        puzzle_k: k,
        iterations,
        exchange,
        crypto_floor,
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Result of [`r1_rate`].
#[derive(Clone, Debug)]
pub struct R1Report {
    /// HI algorithm of the responder.
    pub algorithm: Algorithm,
    /// R1s answered per second from the pool.
    pub pool_per_sec: f64,
    /// R1s per second when each is signed afresh (the baseline).
    pub signed_per_sec: f64,
}

/// Measures R1 answers per second from the precomputed pool for `n` I1s.
pub fn r1_rate(alg: Algorithm, n: u32) -> R1Report {
    let now = Instant::now();
    // The pool's throughput, not the limiters' (one source address and one instant here:
    // the per-address bucket and the global budget for unexpected initiators would refuse
    // all but the first thousand I1s).
    let cfg = Config {
        r1_rate_per_address: u32::MAX,
        r1_burst_per_address: u32::MAX,
        r1_rate_unexpected: u32::MAX,
        r1_burst_unexpected: u32::MAX,
        ..Config::default()
    };
    let mut b = Endpoint::new(
        cfg,
        identity(alg, 2),
        Box::new(ChaCha20Rng::seed_from_u64(21)),
        now,
    )
    .expect("endpoint");
    let (src, dst) = (loc("2001:db8::a"), loc("2001:db8::b"));
    let i1s: Vec<Vec<u8>> = (0..64u8)
        .map(|x| {
            let mut h = [0x20u8; 16];
            h[15] = x;
            let mut pb = PacketBuilder::new(PacketType::I1, 0, Hit(h), b.hit());
            pb.push(&Param::DhGroupList(vec![7])).expect("fits");
            let mut p = pb.finish();
            wire::set_checksum(&mut p, src, dst);
            p
        })
        .collect();
    let t0 = Instant::now();
    for k in 0..n {
        b.handle_packet(now, src, dst, &i1s[k as usize % i1s.len()])
            .expect("I1 accepted");
        black_box(b.poll_transmit().expect("R1"));
    }
    let pool_per_sec = n as f64 / t0.elapsed().as_secs_f64();
    // Baseline: what answering would cost without precomputation (one signature per R1).
    let id = identity(alg, 2);
    let m = n.clamp(1, 200);
    let t0 = Instant::now();
    for _ in 0..m {
        black_box(id.sign(&[0u8; 400]).expect("sign"));
    }
    let signed_per_sec = m as f64 / t0.elapsed().as_secs_f64();
    R1Report {
        algorithm: alg,
        pool_per_sec,
        signed_per_sec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark code paths work (numbers are not checked: timing belongs to
    /// `hip-proto-bench`, never to a unit test).
    #[test]
    fn bench_functions_run() {
        let r = exchange_vs_crypto_floor(Algorithm::Ed25519, DhGroup::NistP256, 2, 25);
        assert_eq!(r.iterations, 25);
        let r = r1_rate(Algorithm::Ed25519, 100);
        assert!(r.pool_per_sec > 0.0);
    }
}
