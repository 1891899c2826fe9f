//! `kvferry bench` as users run it: its own target child process, or a
//! separate target and initiator; every byte verified; JSON on stdout.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn kvferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvferry"))
}

fn bench_json(args: &[&str]) -> String {
    let out = kvferry()
        .arg("bench")
        .args([
            "--duration",
            "0.2",
            "--warmup",
            "0",
            "--buffer-size",
            "4M",
            "--block-size",
            "16K",
            "--batch-size",
            "8",
            "--verify",
            "--json",
        ])
        .args(args)
        .output()
        .expect("run kvferry bench");
    assert!(
        out.status.success(),
        "kvferry bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).expect("utf-8");
    assert!(s.trim().starts_with('{') && s.trim().ends_with('}'), "{s}");
    s
}

#[test]
fn one_process_mode_reads_and_writes_over_tcp_and_the_default_path() {
    for op in ["read", "write"] {
        let j = bench_json(&["--transport", "tcp", "--operation", op, "--threads", "2"]);
        assert!(j.contains("\"transport\":\"tcp\""), "{j}");
        assert!(j.contains("\"verified\":true"), "{j}");
        // The default path between two processes of one host: cma, or tcp
        // where the kernel refuses cross-memory attach.
        let j = bench_json(&["--operation", op]);
        assert!(
            j.contains("\"transport\":\"cma\"") || j.contains("\"transport\":\"tcp\""),
            "{j}"
        );
    }
}

#[test]
fn target_and_initiator_in_separate_processes() {
    let mut target = kvferry()
        .args([
            "bench",
            "--mode",
            "target",
            "--buffer-size",
            "4M",
            "--until-stdin-closes",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the target");
    let mut line = String::new();
    BufReader::new(target.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("TARGET line");
    let name = line.split_whitespace().nth(1).expect("name").to_owned();
    let j = bench_json(&[
        "--mode",
        "initiator",
        "--segment",
        &name,
        "--transport",
        "tcp",
    ]);
    assert!(j.contains(&format!("\"target\":\"{name}\"")), "{j}");
    drop(target.stdin.take());
    assert!(target.wait().expect("target exit").success());
}

#[test]
fn local_transport_needs_both_engines_in_one_process() {
    // An initiator alone cannot measure memcpy between two engines: it
    // says so instead of silently measuring something else.
    let out = kvferry()
        .args([
            "bench",
            "--mode",
            "initiator",
            "--segment",
            "127.0.0.1:1",
            "--transport",
            "local",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mode both"));
}
