//! Build script of kvferry-ascend-sys.
//!
//! 1. Finds the CANN ACL headers (see [`find_headers`] for the order).
//! 2. Runs bindgen over `acl/acl.h`, allowlisted to the ACL subset kvferry
//!    calls, with run-time loading (`dynamic_library_name`): nothing is linked,
//!    so the crate builds and runs where CANN is absent.
//! 3. Tells the crate, and dependents' build scripts, which functions the
//!    headers declare (older CANN lacks some of the subset) and where the
//!    headers are (the CANN stand-in test library compiles against them).
//!
//! The headers are under the CANN Open Software License: they and the code
//! generated from them only ever live in OUT_DIR, never in the source tree.

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

include!("src/functions.rs");

/// Functions present in every CANN release kvferry can work with: headers
/// that lack one of these are not ACL headers we understand, and the build
/// fails. The rest of [`FUNCTIONS`] is newer (pointer attributes, host
/// registration, stream abort, batch copy, IPC by key: the torch-npu 2.5 /
/// ACL 1.12 headers lack all of them, 2.9 / ACL 1.15 lacks host registration
/// and IPC) and merely left out, with a warning, when the headers lack it.
const REQUIRED: &[&str] = &[
    "aclInit",
    "aclFinalize",
    "aclGetRecentErrMsg",
    "aclrtSetDevice",
    "aclrtGetDevice",
    "aclrtGetDeviceCount",
    "aclrtGetCurrentContext",
    "aclrtSetCurrentContext",
    "aclrtDestroyStream",
    "aclrtMemcpy",
    "aclrtMemcpyAsync",
    "aclrtMalloc",
    "aclrtFree",
    "aclrtMallocHost",
    "aclrtFreeHost",
];

/// Types the subset's signatures use. bindgen would follow them from the
/// functions anyway; listing them keeps the allowlist the single place that
/// says what the crate exposes.
const TYPES: &[&str] = &[
    "aclError",
    "aclrtStream",
    "aclrtContext",
    "aclrtMemcpyKind",
    "aclrtMemMallocPolicy",
    // The real header calls the pointer-attribute struct aclrtPtrAttributes
    // (with aclrtMemLocation / aclrtMemLocationType inside).
    "aclrtPtrAttributes",
    "aclrtMemLocation",
    "aclrtMemLocationType",
    "aclrtMemcpyBatchAttr",
    "aclrtHostRegisterType",
];

/// Constants: flags the subset takes, and the error codes kvferry (or a
/// person reading an error) needs to tell apart. Error codes outside this list
/// still surface, as numbers with aclGetRecentErrMsg's text.
const VARS: &[&str] = &[
    // Header version (acl_rt.h), reported by HEADER_VERSION.
    "ACL_MAJOR_VERSION",
    "ACL_MINOR_VERSION",
    "ACL_PATCH_VERSION",
    // aclrtCreateStreamWithConfig flags.
    "ACL_STREAM_FAST_LAUNCH",
    "ACL_STREAM_FAST_SYNC",
    // aclrtIpcMemGetExportKey / aclrtIpcMemImportByKey flags.
    "ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT",
    "ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION",
    "ACL_RT_IPC_MEM_IMPORT_FLAG_DEFAULT",
    "ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS",
    // Success, and aclInit's "already initialised": torch_npu calls aclInit
    // before kvferry does in a vLLM process, so this code is not a failure.
    "ACL_SUCCESS",
    "ACL_ERROR_REPEAT_INITIALIZE",
    "ACL_ERROR_REPEAT_FINALIZE",
    "ACL_ERROR_UNINITIALIZE",
    "ACL_ERROR_INVALID_PARAM",
    "ACL_ERROR_BAD_ALLOC",
    "ACL_ERROR_API_NOT_SUPPORT",
    "ACL_ERROR_INVALID_DEVICE",
    "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED",
    "ACL_ERROR_FEATURE_UNSUPPORTED",
    "ACL_ERROR_RT_PARAM_INVALID",
    "ACL_ERROR_RT_INVALID_DEVICEID",
    // The calling thread has no device / context: the error of a worker
    // thread that did not call aclrtSetDevice.
    "ACL_ERROR_RT_CONTEXT_NULL",
    "ACL_ERROR_RT_STREAM_CONTEXT",
    "ACL_ERROR_RT_ADDR_UNALIGNED",
    "ACL_ERROR_RT_INVALID_HANDLE",
    "ACL_ERROR_RT_STREAM_ABORT",
    "ACL_ERROR_RT_DEVICE_TASK_ABORT",
    "ACL_ERROR_RT_FEATURE_NOT_SUPPORT",
    "ACL_ERROR_RT_MEMORY_ALLOCATION",
    "ACL_ERROR_RT_NO_DEVICE",
    "ACL_ERROR_RT_NO_PERMISSION",
    "ACL_ERROR_RT_INTERNAL_ERROR",
    "ACL_ERROR_RT_STREAM_NOT_COMPLETE",
    "ACL_ERROR_RT_SYS_DMA",
    "ACL_ERROR_RT_IPC_ERROR",
    // aclrtSynchronizeStreamWithTimeout's timeout: the stream must be aborted.
    "ACL_ERROR_RT_STREAM_SYNC_TIMEOUT",
];

/// torch-npu versions whose wheel is fetched when no CANN install is found,
/// newest first. Their `torch_npu/include/third_party/acl/inc` holds the
/// public ACL headers of the CANN release the wheel was built against.
const WHEEL_VERSIONS: &[&str] = &["2.14.0", "2.13.0", "2.12.0"];

/// Where, inside the torch-npu wheel, the ACL headers live.
const WHEEL_ACL_PREFIX: &str = "torch_npu/include/third_party/acl/inc/";

/// The default CANN toolkit location.
const DEFAULT_TOOLKIT_INCLUDE: &str = "/usr/local/Ascend/ascend-toolkit/latest/include";

fn main() {
    if let Err(message) = run() {
        // A build script reports failure by exiting non-zero; cargo shows
        // stderr. The message says what was tried and how to fix it.
        eprintln!("error: kvferry-ascend-sys: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/functions.rs");
    for var in [
        "KVFERRY_CANN_INCLUDE",
        "KVFERRY_CANN_WHEEL",
        "ASCEND_TOOLKIT_HOME",
        "ASCEND_HOME_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);

    let headers = find_headers(&out_dir)?;
    let bindings = generate(&headers.include)?;

    let declared: BTreeSet<&str> = FUNCTIONS
        .iter()
        .copied()
        .filter(|name| bindings.contains(&format!("pub unsafe fn {name}(")))
        .collect();
    let missing_required: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|name| !declared.contains(name))
        .collect();
    if !missing_required.is_empty() {
        return Err(format!(
            "the ACL headers in {} ({}) do not declare {}: not CANN ACL headers this crate understands",
            headers.include.display(),
            headers.source,
            missing_required.join(", ")
        ));
    }
    let missing: Vec<&str> = FUNCTIONS
        .iter()
        .copied()
        .filter(|name| !declared.contains(name))
        .collect();
    if !missing.is_empty() {
        println!(
            "cargo:warning=the ACL headers in {} ({}) do not declare {}; kvferry-ascend-sys leaves those calls out",
            headers.include.display(),
            headers.source,
            missing.join(", ")
        );
    }

    fs::write(out_dir.join("acl_bindings.rs"), &bindings)
        .map_err(|e| format!("cannot write the bindings into {}: {e}", out_dir.display()))?;
    fs::write(out_dir.join("acl_code_names.rs"), code_names(&bindings))
        .map_err(|e| format!("cannot write the error-code table: {e}"))?;

    let all = FUNCTIONS
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    println!("cargo:rustc-check-cfg=cfg(kvferry_acl_has, values({all}))");
    for name in &declared {
        println!("cargo:rustc-cfg=kvferry_acl_has=\"{name}\"");
    }
    let declared_list = declared.iter().copied().collect::<Vec<_>>().join(",");
    println!("cargo:rustc-env=KVFERRY_ACL_DECLARED_FUNCTIONS={declared_list}");
    let version = header_version(&bindings);
    println!(
        "cargo:rustc-env=KVFERRY_ACL_HEADER_SOURCE={}",
        headers.source
    );
    println!("cargo:rustc-env=KVFERRY_ACL_HEADER_VERSION={version}");
    println!(
        "cargo:rustc-env=KVFERRY_ACL_INCLUDE_DIR={}",
        headers.include.display()
    );
    // Metadata for dependents' build scripts (DEP_KVFERRY_ASCEND_ACL_*).
    println!("cargo:include={}", headers.include.display());
    println!("cargo:functions={declared_list}");
    println!("cargo:header_version={version}");
    Ok(())
}

/// Where the headers were found: `include` holds `acl/acl.h`.
struct Headers {
    include: PathBuf,
    source: String,
}

/// Finds the ACL headers, in this order:
///
/// 1. `KVFERRY_CANN_INCLUDE`: a directory holding `acl/acl.h` (an error if not);
/// 2. `KVFERRY_CANN_WHEEL`: a torch-npu wheel file, or a directory that caches
///    one (created, and the wheel downloaded into it, when need be); both
///    explicit settings win over any CANN install, because someone set them
///    on purpose;
/// 3. `$ASCEND_TOOLKIT_HOME/include`, 4. `$ASCEND_HOME_PATH/include`,
///    5. `/usr/local/Ascend/ascend-toolkit/latest/include`;
/// 6. the torch-npu wheel, downloaded with pip into OUT_DIR once and reused.
fn find_headers(out_dir: &Path) -> Result<Headers, String> {
    if let Some(dir) = env_path("KVFERRY_CANN_INCLUDE") {
        if has_acl(&dir) {
            return Ok(Headers {
                source: format!("KVFERRY_CANN_INCLUDE={}", dir.display()),
                include: dir,
            });
        }
        return Err(format!(
            "KVFERRY_CANN_INCLUDE={} has no acl/acl.h and acl/acl_rt.h",
            dir.display()
        ));
    }
    if let Some(wheel) = env_path("KVFERRY_CANN_WHEEL") {
        let file = if wheel.is_file() {
            wheel.clone()
        } else if wheel.extension().is_some_and(|ext| ext == "whl") {
            return Err(format!(
                "KVFERRY_CANN_WHEEL={} does not exist",
                wheel.display()
            ));
        } else {
            // A cache directory (created if need be) shared by every build
            // that sets it: debug, release, clippy, other checkouts.
            download_wheel(&wheel)?
        };
        let include = extract_wheel(&file, out_dir)?;
        return Ok(Headers {
            source: format!(
                "KVFERRY_CANN_WHEEL: {}",
                file.file_name().unwrap_or_default().to_string_lossy()
            ),
            include,
        });
    }
    for var in ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"] {
        if let Some(home) = env_path(var) {
            let include = home.join("include");
            if has_acl(&include) {
                return Ok(Headers {
                    source: format!("${var}/include"),
                    include,
                });
            }
            println!(
                "cargo:warning={var}={} has no include/acl/acl.h; looking further",
                home.display()
            );
        }
    }
    let default = PathBuf::from(DEFAULT_TOOLKIT_INCLUDE);
    if has_acl(&default) {
        return Ok(Headers {
            source: DEFAULT_TOOLKIT_INCLUDE.to_owned(),
            include: default,
        });
    }
    let file = download_wheel(&out_dir.join("cann-wheel"))?;
    let include = extract_wheel(&file, out_dir)?;
    Ok(Headers {
        source: format!(
            "{} (downloaded with pip; no CANN install found)",
            file.file_name().unwrap_or_default().to_string_lossy()
        ),
        include,
    })
}

fn env_path(var: &str) -> Option<PathBuf> {
    env::var_os(var)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

fn has_acl(include: &Path) -> bool {
    include.join("acl/acl.h").is_file() && include.join("acl/acl_rt.h").is_file()
}

/// Returns the torch-npu wheel cached in `dir`, downloading it there first
/// when there is none.
fn download_wheel(dir: &Path) -> Result<PathBuf, String> {
    if let Some(wheel) = cached_wheel(dir) {
        return Ok(wheel);
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Headers do not depend on the CPU, but a wheel is only published for
    // x86_64 and aarch64; any other build host fetches the x86_64 one.
    let arch = if env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("aarch64") {
        "aarch64"
    } else {
        "x86_64"
    };
    let platform = format!("manylinux_2_28_{arch}");
    let Some(pip) = find_pip() else {
        return Err(format!(
            "no CANN ACL headers found, and no pip to download the torch-npu wheel with \
             (tried python3 -m pip, python -m pip, pip3, pip).\n{FIX}"
        ));
    };
    let mut log = String::new();
    for version in WHEEL_VERSIONS {
        let requirement = format!("torch-npu=={version}");
        // First a fixed platform and interpreter, so every machine gets the
        // same wheel whatever python it has; then whatever fits this python.
        let forms: [Vec<&str>; 2] = [
            vec![
                "--platform",
                &platform,
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
            ],
            vec![],
        ];
        for form in &forms {
            let mut command = Command::new(&pip[0]);
            command
                .args(&pip[1..])
                .args([
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    "--timeout",
                    "60",
                    "-d",
                ])
                .arg(dir)
                .args(form)
                .arg(&requirement);
            let shown = format!("{command:?}");
            match command.output() {
                Ok(output) if output.status.success() => {
                    if let Some(wheel) = cached_wheel(dir) {
                        println!("cargo:warning=fetched the CANN ACL headers: {shown}");
                        return Ok(wheel);
                    }
                    let _ = writeln!(log, "  {shown}: succeeded but left no wheel");
                }
                Ok(output) => {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
                    let _ = writeln!(log, "  {shown}: {}", last.unwrap_or("failed"));
                }
                Err(e) => {
                    let _ = writeln!(log, "  {shown}: {e}");
                }
            }
        }
    }
    Err(format!(
        "no CANN ACL headers found and the torch-npu wheel could not be downloaded.\n\
         pip attempts:\n{log}{FIX}"
    ))
}

/// What to do when no headers can be had.
const FIX: &str = "Searched: KVFERRY_CANN_INCLUDE, KVFERRY_CANN_WHEEL, $ASCEND_TOOLKIT_HOME/include, \
     $ASCEND_HOME_PATH/include, /usr/local/Ascend/ascend-toolkit/latest/include, then PyPI.\n\
     Fix: install CANN (or source its set_env.sh), or set KVFERRY_CANN_INCLUDE to a directory \
     holding acl/acl.h, or KVFERRY_CANN_WHEEL to a downloaded torch-npu wheel, or install \
     python3-pip and allow access to PyPI.";

/// The first way of running pip that works here.
fn find_pip() -> Option<Vec<OsString>> {
    let candidates: [&[&str]; 4] = [
        &["python3", "-m", "pip"],
        &["python", "-m", "pip"],
        &["pip3"],
        &["pip"],
    ];
    candidates.iter().find_map(|candidate| {
        let works = Command::new(candidate[0])
            .args(&candidate[1..])
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        works.then(|| candidate.iter().map(OsString::from).collect())
    })
}

fn cached_wheel(dir: &Path) -> Option<PathBuf> {
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("torch_npu-") && name.ends_with(".whl"))
        })
        .collect();
    // A cache holding several wheels gives the same one every time (the
    // lexically last name).
    wheels.sort();
    wheels.pop()
}

/// Unzips only the ACL headers of `wheel` into OUT_DIR/cann-headers, once per
/// wheel, and returns the include directory.
fn extract_wheel(wheel: &Path, out_dir: &Path) -> Result<PathBuf, String> {
    let dest = out_dir.join("cann-headers");
    let include = dest.join(WHEEL_ACL_PREFIX);
    let stamp = dest.join(".extracted-from");
    let wanted = wheel.display().to_string();
    if has_acl(&include) && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(include);
    }
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| format!("cannot clear {}: {e}", dest.display()))?;
    }
    fs::create_dir_all(&dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;

    const UNZIP_PY: &str = "import sys, zipfile\n\
        wheel, dest, prefix = sys.argv[1:4]\n\
        with zipfile.ZipFile(wheel) as z:\n\
        \x20   names = [n for n in z.namelist() if n.startswith(prefix)]\n\
        \x20   if not names: sys.exit('no ' + prefix + ' in ' + wheel)\n\
        \x20   z.extractall(dest, names)\n";
    let mut log = String::new();
    let mut extracted = false;
    for python in ["python3", "python"] {
        match Command::new(python)
            .args(["-c", UNZIP_PY])
            .arg(wheel)
            .arg(&dest)
            .arg(WHEEL_ACL_PREFIX)
            .output()
        {
            Ok(output) if output.status.success() => {
                extracted = true;
                break;
            }
            Ok(output) => {
                let _ = writeln!(
                    log,
                    "  {python}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Err(e) => {
                let _ = writeln!(log, "  {python}: {e}");
            }
        }
    }
    if !extracted {
        match Command::new("unzip")
            .args(["-q", "-o"])
            .arg(wheel)
            .arg(format!("{WHEEL_ACL_PREFIX}*"))
            .arg("-d")
            .arg(&dest)
            .output()
        {
            Ok(output) if output.status.success() => extracted = true,
            Ok(output) => {
                let _ = writeln!(
                    log,
                    "  unzip: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Err(e) => {
                let _ = writeln!(log, "  unzip: {e}");
            }
        }
    }
    if !extracted || !has_acl(&include) {
        return Err(format!(
            "cannot extract {WHEEL_ACL_PREFIX} from {}:\n{log}",
            wheel.display()
        ));
    }
    fs::write(&stamp, wanted).map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
    Ok(include)
}

/// Types ACL's integer error-code macros as `aclError` (a C `int`), so that a
/// returned code compares with them without casts.
#[derive(Debug)]
struct ErrorCodesAreInt;

impl bindgen::callbacks::ParseCallbacks for ErrorCodesAreInt {
    fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
        (name.starts_with("ACL_ERROR_") || name == "ACL_RT_SUCCESS")
            .then_some(bindgen::callbacks::IntKind::Int)
    }
}

fn anchored(names: &[&str]) -> String {
    format!("^({})$", names.join("|"))
}

fn generate(include: &Path) -> Result<String, String> {
    let bindings = bindgen::Builder::default()
        .header_contents("kvferry_acl.h", "#include \"acl/acl.h\"\n")
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg("-xc")
        // Some ACL releases (1.15, in torch-npu 2.9) put a C++ `constexpr`
        // constant in acl_rt.h; read as C, it is a `const`.
        .clang_arg("-Dconstexpr=const")
        .allowlist_function(anchored(FUNCTIONS))
        .allowlist_type(anchored(TYPES))
        .allowlist_var(anchored(VARS))
        // Plain integer constants, never Rust enums: a value ACL returns that
        // this header version does not know must not be undefined behaviour.
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .dynamic_library_name("AscendCl")
        // Every symbol optional: a missing one is an error at call time.
        .dynamic_link_require_all(false)
        .wrap_unsafe_ops(true)
        .derive_default(true)
        .rust_edition(bindgen::RustEdition::Edition2024)
        .parse_callbacks(Box::new(ErrorCodesAreInt))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .map_err(|e| {
            format!(
                "bindgen failed on {}/acl/acl.h: {e} (bindgen needs libclang: apt-get install libclang-dev)",
                include.display()
            )
        })?;
    Ok(bindings.to_string())
}

/// `(code, name)` pairs for the error codes the bindings define, so an error
/// can say `ACL_ERROR_RT_STREAM_SYNC_TIMEOUT` and not only 507046.
fn code_names(bindings: &str) -> String {
    let mut table = String::from(
        "/// Error codes this crate names, from the ACL headers.\npub(crate) const CODE_NAMES: &[(aclError, &str)] = &[\n",
    );
    for name in VARS.iter().filter(|name| name.starts_with("ACL_ERROR_")) {
        if bindings.contains(&format!("pub const {name}:")) {
            let _ = writeln!(table, "    (ffi::{name}, \"{name}\"),");
        }
    }
    table.push_str("];\n");
    table
}

/// `major.minor.patch` from the ACL_*_VERSION macros, or "unknown".
fn header_version(bindings: &str) -> String {
    let value = |name: &str| -> Option<String> {
        let start = bindings.find(&format!("pub const {name}:"))?;
        let rest = &bindings[start..];
        let eq = rest.find('=')?;
        let end = rest.find(';')?;
        Some(rest[eq + 1..end].trim().to_owned())
    };
    match (
        value("ACL_MAJOR_VERSION"),
        value("ACL_MINOR_VERSION"),
        value("ACL_PATCH_VERSION"),
    ) {
        (Some(major), Some(minor), Some(patch)) => format!("{major}.{minor}.{patch}"),
        _ => "unknown".to_owned(),
    }
}
