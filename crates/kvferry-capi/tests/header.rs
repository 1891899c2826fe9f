//! include/kvferry.h is generated from this crate and committed: it must be
//! what cbindgen generates now. (That it declares exactly what libkvferry.so
//! exports is checked in c_programs.rs, which builds the library.)

use std::path::{Path, PathBuf};

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
