//! `hip-proto-bench [--quick]`: base exchange vs. its crypto floor, and R1s per second from
//! the precomputed pool. One JSON object per line; build with `--release`.

use hip_proto::{
    Algorithm,
    bench::{exchange_vs_crypto_floor, r1_rate},
    crypto::DhGroup,
};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 5 } else { 50 };
    let cases: &[(Algorithm, DhGroup)] = if quick {
        &[(Algorithm::EcdsaP256, DhGroup::NistP256)]
    } else {
        &[
            (Algorithm::EcdsaP256, DhGroup::NistP256),
            (Algorithm::EcdsaP384, DhGroup::NistP384),
            (Algorithm::Ed25519, DhGroup::NistP256),
            (Algorithm::Rsa, DhGroup::NistP256),
            (Algorithm::EcdsaP256, DhGroup::Modp3072),
        ]
    };
    for (alg, g) in cases {
        let r = exchange_vs_crypto_floor(*alg, *g, 8, n);
        println!(
            "{{\"bench\":\"hip_base_exchange\",\"algorithm\":\"{}\",\"dh_group\":\"{}\",\"puzzle_k\":{},\"iterations\":{},\"exchange_us\":{:.1},\"crypto_floor_us\":{:.1},\"ratio\":{:.3}}}",
            alg.name(),
            g.name(),
            r.puzzle_k,
            r.iterations,
            r.exchange.as_secs_f64() * 1e6,
            r.crypto_floor.as_secs_f64() * 1e6,
            r.ratio()
        );
    }
    for alg in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
        let r = r1_rate(alg, if quick { 2_000 } else { 50_000 });
        println!(
            "{{\"bench\":\"hip_r1_pool\",\"algorithm\":\"{}\",\"r1_per_sec\":{:.0},\"signed_r1_per_sec\":{:.0},\"ratio\":{:.1}}}",
            alg.name(),
            r.pool_per_sec,
            r.signed_per_sec,
            r.pool_per_sec / r.signed_per_sec
        );
    }
}
