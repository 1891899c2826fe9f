//! The C ABI from the outside: builds the C and C++ programs under tests/c
//! and tests/cpp against include/ and this crate's libkvferry.so, with
//! warnings as errors and AddressSanitizer + UndefinedBehaviorSanitizer, runs
//! them and fails with their output when they fail. Also compiles each
//! header on its own.
//!
//! Needs gcc and g++ with libasan / libubsan. Build outputs go under
//! `CARGO_TARGET_TMPDIR/c_programs`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    dir.canonicalize().unwrap_or(dir)
}

fn include_dir() -> PathBuf {
    repo().join("include")
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_programs");
    std::fs::create_dir_all(&dir).expect("create the build directory");
    dir
}

/// The directory holding a libkvferry.so built from the current sources:
/// target/<profile>, found from this test executable's path.
///
/// `cargo test` does not build the .so: a cdylib-only library is no
/// dependency of integration tests, so target/<profile>/libkvferry.so is
/// missing on a clean tree and stale after any source change. The first test
/// to ask therefore runs `cargo build -p kvferry-capi` for this test's own
/// profile, target and target directory (Cargo has released its lock on that
/// directory by the time tests run). It is incremental: next to nothing
/// when nothing changed.
fn lib_dir() -> &'static Path {
    static LIB_DIR: OnceLock<PathBuf> = OnceLock::new();
    LIB_DIR.get_or_init(build_library)
}

fn build_library() -> PathBuf {
    // target/<profile>/deps/c_programs-<hash>, or with --target
    // target/<triple>/<profile>/deps/c_programs-<hash>.
    let exe = std::env::current_exe().expect("test path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let target_root = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .expect("profile directory name");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--quiet", "-p", "kvferry-capi", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_root);
    match profile {
        // `cargo test` builds with the test profile, whose directory is debug.
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let above_profile = profile_dir.parent().expect("profile directory's parent");
    if !same_dir(above_profile, &target_root) {
        cmd.arg("--target")
            .arg(above_profile.file_name().expect("target triple"));
    }
    let (ok, output) = run_with_deadline(&mut cmd, "cargo-build", Duration::from_secs(1800));
    assert!(ok, "building libkvferry.so failed:\n{output}");
    let lib = profile_dir.join("libkvferry.so");
    assert!(lib.exists(), "{} not built", lib.display());
    profile_dir
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

const WARNINGS: &[&str] = &["-Wall", "-Wextra", "-Wpedantic", "-Werror"];

/// `-fno-sanitize-recover=all`: UBSan only reports by default and the
/// program would still exit 0; this makes every finding fatal.
const SANITIZERS: &[&str] = &[
    "-g",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

/// The stricter warnings a user of the C++ wrapper may build with; the
/// wrapper must not be the reason their build fails.
const CXX_USER_WARNINGS: &[&str] = &[
    "-Wconversion",
    "-Wsign-conversion",
    "-Wshadow",
    "-Wold-style-cast",
    "-Wuseless-cast",
    "-Wnon-virtual-dtor",
    "-Wcast-qual",
    "-Wzero-as-null-pointer-constant",
];

/// Runs a compiler; panics with its output on failure.
fn compile(compiler: &str, args: &[&OsStr]) {
    let out = Command::new(compiler)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler} (needed for this test): {e}"));
    assert!(
        out.status.success(),
        "{compiler} {} failed:\n{}{}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

enum Lang {
    C,
    Cxx,
}

/// Builds `sources` (paths relative to the repository) into `name` under the
/// build directory, linked to libkvferry.so with an rpath so it runs as is.
fn build(lang: Lang, name: &str, sources: &[&str], defines: &[&str]) -> PathBuf {
    let exe = out_dir().join(name);
    let lib = lib_dir();
    let (compiler, std) = match lang {
        Lang::C => ("gcc", "-std=c99"),
        Lang::Cxx => ("g++", "-std=c++17"),
    };
    let include = format!("-I{}", include_dir().display());
    let libpath = format!("-L{}", lib.display());
    let rpath = format!("-Wl,-rpath,{}", lib.display());
    let sources: Vec<PathBuf> = sources.iter().map(|s| repo().join(s)).collect();
    let mut args: Vec<&OsStr> = vec![OsStr::new(std)];
    args.extend(WARNINGS.iter().map(OsStr::new));
    args.extend(SANITIZERS.iter().map(OsStr::new));
    args.extend(defines.iter().map(OsStr::new));
    args.push(OsStr::new(&include));
    args.extend(sources.iter().map(|s| s.as_os_str()));
    args.extend([
        OsStr::new("-o"),
        exe.as_os_str(),
        OsStr::new(&libpath),
        OsStr::new("-lkvferry"),
        OsStr::new(&rpath),
        OsStr::new("-pthread"),
    ]);
    compile(compiler, &args);
    exe
}

/// Runs `cmd` with its output going to files (not pipes, so a long
/// sanitizer report cannot block it), killing it after `limit`: a hang is a
/// failure, not a stuck CI. Returns whether it succeeded, and its output.
fn run_with_deadline(cmd: &mut Command, stem: &str, limit: Duration) -> (bool, String) {
    let stdout_path = out_dir().join(format!("{stem}.stdout"));
    let stderr_path = out_dir().join(format!("{stem}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    output += &std::fs::read_to_string(&stderr_path).unwrap_or_default();
    if status.is_none() {
        output += &format!("\n(killed after {} s)\n", limit.as_secs());
    }
    (status.is_some_and(|s| s.success()), output)
}

/// Runs a test program with the given ASan leak setting.
fn run_once(exe: &Path, detect_leaks: bool) -> (bool, String) {
    let stem = exe.file_name().and_then(OsStr::to_str).unwrap_or("program");
    let mut cmd = Command::new(exe);
    // Engines made from a NULL config read the environment; the programs
    // expect the defaults.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("KVFERRY_") || k.starts_with("MC_") || k.starts_with("ASCEND_") {
            cmd.env_remove(&key);
        }
    }
    let asan = format!(
        "detect_leaks={}:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1",
        u8::from(detect_leaks)
    );
    cmd.env("ASAN_OPTIONS", asan)
        .env("UBSAN_OPTIONS", "print_stacktrace=1");
    // The programs take a few seconds.
    run_with_deadline(&mut cmd, stem, Duration::from_secs(300))
}

/// Printed by LeakSanitizer when it cannot run, e.g. under ptrace (a
/// debugger, strace, some sandboxes) or without the permissions it needs.
const LSAN_CANNOT_RUN: &[&str] = &[
    "LeakSanitizer has encountered a fatal error",
    "LeakSanitizer does not work under ptrace",
];

/// Runs `exe` with leak detection. Where LeakSanitizer cannot work, runs it
/// again with detect_leaks=0 (saying so), so the rest of ASan still checks
/// it. Panics with the program's output on failure.
fn run(exe: &Path) {
    let (mut ok, mut output) = run_once(exe, true);
    if !ok && LSAN_CANNOT_RUN.iter().any(|m| output.contains(m)) {
        eprintln!(
            "note: LeakSanitizer cannot run here; {} runs with detect_leaks=0",
            exe.display()
        );
        (ok, output) = run_once(exe, false);
    }
    assert!(ok, "{} failed:\n{output}", exe.display());
    print!("{output}");
}

#[test]
fn c_header_compiles_alone_as_c() {
    let header = include_dir().join("kvferry.h");
    for std in ["-std=c99", "-std=c11", "-std=c17"] {
        let mut args: Vec<&OsStr> = vec![OsStr::new("-fsyntax-only"), OsStr::new(std)];
        args.extend(WARNINGS.iter().map(OsStr::new));
        args.extend(["-x", "c"].iter().map(OsStr::new));
        args.push(header.as_os_str());
        compile("gcc", &args);
    }
}

#[test]
fn headers_compile_alone_as_cxx() {
    for header in ["kvferry.h", "kvferry.hpp"] {
        let header = include_dir().join(header);
        let mut args: Vec<&OsStr> = vec![OsStr::new("-fsyntax-only"), OsStr::new("-std=c++17")];
        args.extend(WARNINGS.iter().map(OsStr::new));
        args.extend(CXX_USER_WARNINGS.iter().map(OsStr::new));
        args.extend(["-x", "c++"].iter().map(OsStr::new));
        args.push(header.as_os_str());
        compile("g++", &args);
    }
}

#[test]
fn c_api_test() {
    run(&build(Lang::C, "api_test_c", &["tests/c/api_test.c"], &[]));
}

#[test]
fn c_topology_test() {
    run(&build(
        Lang::C,
        "topology_test_c",
        &["tests/c/topology_test.c"],
        &[],
    ));
}

#[test]
fn cpp_api_test() {
    run(&build(
        Lang::Cxx,
        "api_test_cpp",
        &["tests/cpp/api_test.cpp"],
        &[],
    ));
}

#[test]
fn cpp_headers_included_twice_and_in_two_units() {
    run(&build(
        Lang::Cxx,
        "include_twice",
        &[
            "tests/cpp/include_twice.cpp",
            "tests/cpp/include_twice_other.cpp",
        ],
        &[],
    ));
}

/// Function names declared in the header.
fn declared() -> BTreeSet<String> {
    let header = std::fs::read_to_string(include_dir().join("kvferry.h")).expect("header");
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

/// The C API with NPU memory (tests/c/ascend_test.c): `kvf_config_use_ascend`
/// without a runtime ("Ascend runtime not found") and with the CANN
/// stand-in, `"npu:N"` and `"*"` registration, a read between two engines'
/// device buffers. Runs with and without the `ascend` feature's runtime
/// being found, never with the caller's ACL environment.
#[cfg(feature = "ascend")]
#[test]
fn c_program_moves_npu_memory_through_the_ascend_runtime() {
    let exe = build(Lang::C, "ascend_test", &["tests/c/ascend_test.c"], &[]);
    // KVFERRY_TEST_ACL_LIBRARY=libascendcl.so runs it on an Ascend machine.
    let library = std::env::var("KVFERRY_TEST_ACL_LIBRARY")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| kvferry_cann_standin::STANDIN_LIBRARY.to_owned());
    let attempt = |detect_leaks: bool| {
        let mut cmd = Command::new(&exe);
        cmd.arg(&library);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if ["KVFERRY_", "MC_", "ASCEND_", "KVF_STANDIN_"]
                .iter()
                .any(|p| k.starts_with(p))
            {
                cmd.env_remove(&key);
            }
        }
        cmd.env(
            "ASAN_OPTIONS",
            format!("detect_leaks={}", u8::from(detect_leaks)),
        )
        .env("UBSAN_OPTIONS", "print_stacktrace=1");
        run_with_deadline(&mut cmd, "ascend_test", Duration::from_secs(300))
    };
    let (mut ok, mut output) = attempt(true);
    if !ok && LSAN_CANNOT_RUN.iter().any(|m| output.contains(m)) {
        (ok, output) = attempt(false);
    }
    assert!(ok, "{} failed:\n{output}", exe.display());
    assert!(output.contains("ascend_test: ok"), "{output}");
}
