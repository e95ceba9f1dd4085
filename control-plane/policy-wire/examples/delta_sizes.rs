//! Bytes of each edit of a policy as a fleet `PolicyUpdate`: whole vs delta, raw and
//! zstd (gRPC's level, as misaki-cp sends it). Each argument is a policy file; each
//! one after the first is an edit of the one before it, named by its file stem.
//!
//! ```sh
//! # The bench's cumulative edits: endpoint, then route, then class.
//! k=0; for edit in base endpoint route class; do
//!   python3 bench/lib/config_scale_policy.py --services 3000 --step $k > /tmp/$edit.yaml
//!   k=$((k + 1))
//! done
//! cargo run -p misaki-policy-wire --example delta_sizes -- /tmp/{base,endpoint,route,class}.yaml
//! ```
use std::path::Path;

use prost::Message;

fn zstd_len(bytes: &[u8]) -> usize {
    zstd::encode_all(bytes, zstd::DEFAULT_COMPRESSION_LEVEL)
        .expect("zstd of a buffer")
        .len()
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.len() < 2 {
        eprintln!("usage: delta_sizes BASE.yaml EDIT.yaml [EDIT.yaml...]");
        std::process::exit(64);
    }
    let wires: Vec<_> = paths
        .iter()
        .map(|p| {
            let policy = misaki_policy::load_path(Path::new(p)).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(65);
            });
            misaki_policy_wire::to_wire(&policy)
        })
        .collect();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "edit", "whole", "whole zstd", "delta", "delta zstd"
    );
    for (i, pair) in wires.windows(2).enumerate() {
        let (base, target) = (&pair[0], &pair[1]);
        let delta = misaki_policy_wire::diff(base, target).expect("whole updates diff");
        assert_eq!(misaki_policy_wire::apply(base, &delta).as_ref(), Ok(target));
        let (whole, delta) = (target.encode_to_vec(), delta.encode_to_vec());
        let name = Path::new(&paths[i + 1])
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        println!(
            "{name:<24} {:>10} {:>10} {:>10} {:>10}",
            whole.len(),
            zstd_len(&whole),
            delta.len(),
            zstd_len(&delta)
        );
    }
}
