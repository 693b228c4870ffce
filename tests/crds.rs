//! The CRDs committed in `crds/` and `charts/deputy/crds/` must equal what the code generates.
//! Regenerate both with `DEPUTY_UPDATE_CRDS=1 cargo test --test crds`.

use std::collections::BTreeSet;
use std::path::Path;

const DIRS: [&str; 2] = ["crds", "charts/deputy/crds"];

#[test]
fn committed_crds_equal_the_generated_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = deputy::resources::crd_files().expect("CRDs render");
    assert_eq!(files.len(), 4);
    if std::env::var_os("DEPUTY_UPDATE_CRDS").is_some() {
        for dir in DIRS {
            for (name, yaml) in &files {
                std::fs::write(root.join(dir).join(name), yaml).expect("write CRD");
            }
        }
    }
    for dir in DIRS {
        let on_disk: BTreeSet<String> = std::fs::read_dir(root.join(dir))
            .expect("CRD directory exists")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        let expected: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(on_disk, expected, "{dir}/ holds exactly one file per kind");
        for (name, yaml) in &files {
            let committed = std::fs::read_to_string(root.join(dir).join(name)).expect("read CRD");
            assert!(
                committed == *yaml,
                "{dir}/{name} differs from `deputy crd`; run DEPUTY_UPDATE_CRDS=1 cargo test --test crds"
            );
        }
    }
}

#[test]
fn deputy_crd_prints_every_committed_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deputy")).arg("crd").output().expect("run deputy crd");
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let mut expected = String::new();
    for (_, yaml) in deputy::resources::crd_files().expect("CRDs render") {
        expected.push_str("---\n");
        expected.push_str(&yaml);
    }
    assert_eq!(printed, expected);
}
