//! `hip-agent hi new|show|import-xml`: Host Identity files.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Subcommand;
use hip_proto::{Algorithm, HostIdentity, keyfile, legacy};
use rand_core::SeedableRng;

/// Host Identity commands.
#[derive(Subcommand)]
pub enum HiCmd {
    /// Generate a Host Identity and write it to FILE (PKCS#8 PEM, mode 0600; an existing
    /// file is never overwritten).
    New {
        /// ecdsa-p256 (default), ecdsa-p384, rsa (3072-bit) or ed25519.
        #[arg(long, default_value = "ecdsa-p256")]
        algorithm: String,
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the algorithm, HIT and HI of a key file.
    Show {
        /// The key file (refused if group or others can access it).
        file: PathBuf,
        /// JSON: `algorithm`, `hit`, `hit_hex`, `hi_algorithm`, `hi` (base64).
        #[arg(long)]
        json: bool,
    },
    /// Read the Boeing implementation's XML `<host_identity>` format (draft section 3.3)
    /// and check each legacy HIT against the key.
    ImportXml {
        /// The XML file.
        file: PathBuf,
        /// JSON array: `name`, `algorithm`, `hit_declared`, `hit_computed`, `matches`,
        /// and `error` when the key cannot be decoded.
        #[arg(long)]
        json: bool,
    },
}

fn describe(id: &HostIdentity) -> serde_json::Value {
    let h = id.host_id();
    serde_json::json!({
        "algorithm": h.algorithm_name(),
        "hit": id.hit().to_string(),
        "hit_hex": id.hit().to_hex32(),
        "hit_suite": h.hit_suite().id(),
        "hi_algorithm": h.algorithm() as u16,
        "hi": base64::engine::general_purpose::STANDARD.encode(h.to_hi_bytes()),
    })
}

fn print(v: &serde_json::Value, json: bool) {
    if json {
        println!("{v}");
    } else if let Some(o) = v.as_object() {
        for (k, v) in o {
            println!(
                "{k}: {}",
                v.as_str().map(str::to_owned).unwrap_or(v.to_string())
            );
        }
    }
}

/// Runs a `hi` subcommand.
pub fn run(cmd: HiCmd) -> Result<()> {
    match cmd {
        HiCmd::New {
            algorithm,
            out,
            json,
        } => {
            let alg = Algorithm::from_name(&algorithm).with_context(|| {
                format!("unknown algorithm {algorithm:?} (ecdsa-p256, ecdsa-p384, rsa, ed25519)")
            })?;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("OS RNG: {e}"))?;
            let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
            let id = HostIdentity::generate(alg, &mut rng)?;
            keyfile::save(&out, &id)?;
            print(&describe(&id), json);
        }
        HiCmd::Show { file, json } => {
            let id = keyfile::load(&file)?;
            print(&describe(&id), json);
        }
        HiCmd::ImportXml { file, json } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ids = legacy::parse_host_identities(&text)?;
            let mut out = Vec::new();
            let mut errors = Vec::new();
            for x in &ids {
                let computed = x.key.as_ref().ok().and_then(|k| k.legacy_hit());
                let mut v = serde_json::json!({
                    "name": x.name,
                    "algorithm": x.algorithm,
                    "hit_declared": x.hit_declared.map(|h| h.to_hex32()),
                    "hit_computed": computed.map(|h| h.to_hex32()),
                    "matches": computed.is_some() && computed == x.hit_declared,
                });
                if let Err(e) = &x.key {
                    v["error"] = e.clone().into();
                    errors.push(format!("{}: {e}", x.name));
                }
                out.push(v);
            }
            if json {
                println!("{}", serde_json::Value::Array(out));
            } else {
                for v in &out {
                    println!(
                        "{}  {}  declared {}  computed {}  matches {}",
                        v["name"].as_str().unwrap_or(""),
                        v["algorithm"].as_str().unwrap_or(""),
                        v["hit_declared"].as_str().unwrap_or("-"),
                        v["hit_computed"].as_str().unwrap_or("-"),
                        v["matches"]
                    );
                }
            }
            if !errors.is_empty() {
                bail!("{}", errors.join("; "));
            }
        }
    }
    Ok(())
}
