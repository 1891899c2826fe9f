//! include/kvferry.h is generated from this crate and committed: it must be
//! what cbindgen generates now, and it must declare exactly the functions
//! libkvferry.so exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generate() -> String {
    let config = cbindgen::Config::from_file(repo().join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(env!("CARGO_MANIFEST_DIR"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut out);
    String::from_utf8(out).expect("utf-8 header")
}

#[test]
fn header_matches_generated() {
    let path = repo().join("include/kvferry.h");
    let fresh = generate();
    if std::env::var_os("KVFERRY_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/kvferry.h is stale: run `KVFERRY_BLESS=1 cargo test -p kvferry-capi --test header` and commit it"
    );
}

/// Function names declared in the header.
fn declared() -> BTreeSet<String> {
    let header = std::fs::read_to_string(repo().join("include/kvferry.h")).expect("header");
    let mut names = BTreeSet::new();
    for line in header.lines() {
        let l = line.trim_start();
        if l.starts_with("//") || l.starts_with('#') || l.starts_with('*') {
            continue;
        }
        let Some(open) = l.find('(') else { continue };
        let name = l[..open]
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next_back()
            .unwrap_or_default();
        if name.starts_with("kvf_") {
            names.insert(name.to_owned());
        }
    }
    names
}

/// Defined dynamic function symbols of the shared library.
fn exported(lib: &Path) -> BTreeSet<String> {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib)
        .output()
        .expect("nm (binutils) is needed for this test");
    assert!(
        out.status.success(),
        "nm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (_addr, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            (kind == "T").then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn shared_library_exports_exactly_the_header() {
    // Cargo builds this crate's cdylib next to the test's deps directory.
    let exe = std::env::current_exe().expect("test path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let lib = profile_dir.join("libkvferry.so");
    assert!(lib.exists(), "{} not built", lib.display());
    let exported = exported(&lib);
    let declared = declared();
    assert!(declared.len() > 20, "header parse found only {declared:?}");
    let extra: Vec<_> = exported.difference(&declared).collect();
    let missing: Vec<_> = declared.difference(&exported).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "exported but not declared: {extra:?}; declared but not exported: {missing:?}"
    );
}
