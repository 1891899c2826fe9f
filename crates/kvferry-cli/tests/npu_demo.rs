//! `kvferry demo --device npu` against the CANN stand-in: a small KV cache
//! pulled NPU to NPU between two processes, same host (ascend-ipc) and over
//! tcp with staging, every byte verified by the demo itself.

#![cfg(feature = "ascend")]

use std::process::Command;

/// The CANN stand-in, or a real runtime (KVFERRY_TEST_ACL_LIBRARY).
fn library() -> String {
    std::env::var("KVFERRY_TEST_ACL_LIBRARY")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| kvferry_cann_standin::STANDIN_LIBRARY.to_owned())
}

#[test]
fn the_npu_demo_moves_and_verifies_a_kv_cache() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args([
            "demo",
            "--device",
            "npu",
            "--layers",
            "2",
            "--blocks",
            "16",
            "--block-tokens",
            "16",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--requests",
            "4",
            "--blocks-per-request",
            "5",
        ])
        .env("KVFERRY_ACL_LIBRARY", library())
        .env_remove("KVFERRY_TRANSPORT")
        .env_remove("KVF_STANDIN_FAIL")
        .env_remove("KVF_STANDIN_TIMEOUT")
        .output()
        .expect("run kvferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("KV cache on npu:0"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("GB/s")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("ascend-ipc"), "{stdout}");
    assert!(lines[1].starts_with("tcp"), "{stdout}");
}

#[test]
fn without_a_runtime_the_npu_demo_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvferry"))
        .args(["demo", "--device", "npu", "--layers", "1", "--blocks", "32"])
        .env("KVFERRY_ACL_LIBRARY", "/nonexistent/libascendcl.so")
        .output()
        .expect("run kvferry demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Ascend runtime not found"), "{stderr}");
}
