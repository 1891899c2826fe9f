//! Builds the CANN stand-in test library, `libkvferry_cann_standin.so`, from
//! `tests/cann-standin/standin.c`, against the real CANN headers that
//! kvferry-ascend-sys's build found (so the compiler checks that every
//! stand-in function has CANN's signature).

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    if let Err(message) = run() {
        eprintln!("error: kvferry-cann-standin: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?);
    let source = manifest.join("../../tests/cann-standin/standin.c");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=build.rs");
    let include = env::var("DEP_KVFERRY_ASCEND_ACL_INCLUDE").map_err(
        |_| "DEP_KVFERRY_ASCEND_ACL_INCLUDE is not set: kvferry-ascend-sys must be a dependency",
    )?;
    // The same `kvferry_acl_has = "<function>"` cfgs kvferry-ascend-sys has,
    // so this crate's code calls only the functions the headers declare.
    let functions = env::var("DEP_KVFERRY_ASCEND_ACL_FUNCTIONS").unwrap_or_default();
    println!("cargo:rustc-check-cfg=cfg(kvferry_acl_has, values(any()))");
    let declared: Vec<&str> = functions.split(',').filter(|f| !f.is_empty()).collect();
    for function in &declared {
        println!("cargo:rustc-cfg=kvferry_acl_has=\"{function}\"");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    compile(
        &source,
        &include,
        &declared,
        &out_dir.join("libkvferry_cann_standin.so"),
    )?;
    // The same stand-in without the functions newer CANN releases added: an
    // older libascendcl.so under newer headers, for the "symbol missing at
    // run time" path.
    let older: Vec<&str> = declared
        .iter()
        .copied()
        .filter(|function| !NEWER.contains(function))
        .collect();
    compile(
        &source,
        &include,
        &older,
        &out_dir.join("libkvferry_cann_standin_older.so"),
    )
}

/// The functions of the subset that older CANN releases lack.
const NEWER: &[&str] = &[
    "aclrtPointerGetAttributes",
    "aclrtHostRegister",
    "aclrtHostUnregister",
    "aclrtStreamAbort",
    "aclrtMemcpyBatch",
    "aclrtMemcpyBatchAsync",
    "aclrtDeviceGetBareTgid",
    "aclrtIpcMemGetExportKey",
    "aclrtIpcMemSetImportPid",
    "aclrtIpcMemImportByKey",
    "aclrtIpcMemClose",
];

fn compile(source: &Path, include: &str, functions: &[&str], library: &Path) -> Result<(), String> {
    let soname = library
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    // cc picks the C compiler for the target (and honours CC / CFLAGS); the
    // stand-in is a shared library, which cc::Build does not link itself.
    let compiler = cc::Build::new().opt_level(1).debug(true).get_compiler();
    let mut command = compiler.to_command();
    command
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Wshadow",
            "-Werror",
            "-fPIC",
            "-shared",
            // Export exactly the ACL functions: the header marks them
            // visibility("default") when FUNC_VISIBILITY is defined.
            "-fvisibility=hidden",
            "-DFUNC_VISIBILITY",
            // As in kvferry-ascend-sys's bindgen run: ACL 1.15's acl_rt.h has
            // a C++ `constexpr` constant, which C reads as `const`.
            "-Dconstexpr=const",
        ])
        .arg(format!("-I{include}"))
        // The C side of the cfgs: KVF_HAS_<function>.
        .args(
            functions
                .iter()
                .map(|function| format!("-DKVF_HAS_{function}")),
        )
        .arg("-o")
        .arg(library)
        .arg(source)
        .args(["-pthread", "-lrt", "-Wl,--no-undefined"])
        .arg(format!("-Wl,-soname,{soname}"));
    // The program and its arguments (not the environment cc sets up).
    let shown = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .output()
        .map_err(|e| format!("cannot run the C compiler ({shown}): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "compiling the CANN stand-in failed:\n{shown}\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
