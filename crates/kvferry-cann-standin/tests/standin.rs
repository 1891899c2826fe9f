//! kvferry-ascend-sys against the CANN stand-in.
//!
//! Each scenario runs in its own process (the `acl-standin-probe` binary),
//! which loads ACL through `Acl::load()` with `KVFERRY_ACL_LIBRARY` pointing at
//! the stand-in, exactly as kvferry would load `libascendcl.so`. A process per
//! scenario keeps ACL's process-wide state (aclInit, call counters for failure
//! injection) and the environment (read by the stand-in at call time) apart.

use std::process::{Command, Stdio};

use kvferry_ascend_sys::{Acl, FUNCTIONS, LIBRARY_ENV, declared_functions, ffi};
use kvferry_cann_standin::{FAIL_ENV, OLDER_STANDIN_LIBRARY, STANDIN_LIBRARY};

const PROBE: &str = env!("CARGO_BIN_EXE_acl-standin-probe");

/// The probe, with the stand-in as ACL and only the given injections.
fn probe_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(PROBE);
    command.args(args).env(LIBRARY_ENV, STANDIN_LIBRARY);
    for (name, _) in std::env::vars() {
        if name.starts_with("KVF_STANDIN_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// What a probe run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The tab-separated fields after `tag` on the first line starting with it.
    fn fields(&self, tag: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .find_map(|line| {
                let mut parts = line.split('\t');
                (parts.next() == Some(tag)).then(|| parts.collect())
            })
            .unwrap_or_else(|| panic!("no {tag} line in:\n{}\n{}", self.stdout, self.stderr))
    }

    fn has(&self, tag: &str) -> bool {
        self.stdout
            .lines()
            .any(|line| line.split('\t').next() == Some(tag))
    }

    fn succeeded(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "probe failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The ACL error the probe ended with: (function, code, message).
    fn acl_error(&self) -> (String, i32, String) {
        assert_eq!(
            self.code,
            Some(2),
            "expected an ACL error:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        let fields = self.fields("ACL-ERROR");
        let code = fields[1].parse().expect("numeric code");
        (fields[0].to_owned(), code, fields[2].to_owned())
    }
}

fn probe(args: &[&str], env: &[(&str, &str)]) -> Run {
    let output = probe_command(args, env)
        .stdin(Stdio::null())
        .output()
        .expect("run the probe");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn the_standin_exports_the_whole_acl_subset() {
    // Everything the headers declare (all of FUNCTIONS with current CANN
    // headers; older ones lack the newest few, and so does the stand-in).
    let undeclared: Vec<&str> = FUNCTIONS
        .iter()
        .copied()
        .filter(|function| !declared_functions().any(|declared| declared == *function))
        .collect();
    let acl = Acl::load_from(STANDIN_LIBRARY).expect("load the stand-in");
    assert_eq!(acl.missing_functions(), undeclared);

    let run = probe(&["load"], &[]);
    run.succeeded();
    assert_eq!(run.fields("LOADED"), [STANDIN_LIBRARY]);
    assert_eq!(run.fields("MISSING"), [undeclared.join(",")]);
}

#[test]
fn a_function_the_runtime_lacks_is_an_error_not_a_crash() {
    let acl = Acl::load_from(OLDER_STANDIN_LIBRARY).expect("load the older stand-in");
    let newer = [
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
    let missing = acl.missing_functions();
    for function in newer {
        assert!(missing.contains(&function), "{function} in {missing:?}");
        assert!(!acl.is_available(function));
    }
    assert!(acl.is_available("aclrtMemcpy"));

    #[cfg(kvferry_acl_has = "aclrtStreamAbort")]
    {
        // SAFETY: the call never reaches ACL: the symbol is missing.
        let error = unsafe { acl.aclrtStreamAbort(std::ptr::null_mut()) }.unwrap_err();
        assert_eq!(error.function(), Some("aclrtStreamAbort"));
        assert!(matches!(
            error,
            kvferry_ascend_sys::AclError::Unavailable { .. }
        ));
        let text = error.to_string();
        assert!(
            text.starts_with("aclrtStreamAbort is not available in the Ascend runtime ")
                && text.contains("undefined symbol: aclrtStreamAbort"),
            "{text}"
        );
    }
}

#[test]
fn a_missing_library_is_reported_as_ascend_runtime_not_found() {
    let mut command = probe_command(&["load"], &[]);
    command.env(LIBRARY_ENV, "/nonexistent/libascendcl.so");
    let output = command.output().expect("run the probe");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    let line = stdout.lines().next().unwrap_or_default();
    assert!(
        line.starts_with(
            "LOAD-ERROR\tAscend runtime not found: /nonexistent/libascendcl.so: cannot open shared object file"
        ),
        "{line}"
    );

    let error = Acl::load_from("/nonexistent/libascendcl.so").unwrap_err();
    assert!(error.to_string().starts_with("Ascend runtime not found: "));
}

#[test]
fn memory_goes_host_to_device_to_host_unchanged() {
    let run = probe(&["roundtrip"], &[]);
    run.succeeded();
    assert_eq!(
        run.fields("INIT-AGAIN"),
        [ffi::ACL_ERROR_REPEAT_INITIALIZE.to_string()]
    );
    assert_eq!(run.fields("DEVICES"), ["8"]);
    assert_eq!(run.fields("DEVICE"), ["1"]);
    assert_eq!(run.fields("ROUNDTRIP"), ["equal"]);
    assert_eq!(run.fields("OFFSET"), ["kvferry"]);
    let over = run.fields("COUNT-OVER-DESTMAX");
    assert_eq!(
        over[..2],
        ["aclrtMemcpy", &ffi::ACL_ERROR_INVALID_PARAM.to_string()]
    );
    assert!(over[2].contains("larger than destMax"), "{}", over[2]);
    let wrong = run.fields("WRONG-KIND");
    assert!(wrong[2].contains("is device memory"), "{}", wrong[2]);
    assert_eq!(run.fields("DOUBLE-FREE")[0], "aclrtFree");
    assert!(run.has("DONE"));
}

#[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
#[test]
fn pointer_attributes_tell_device_memory_from_host_memory() {
    let run = probe(&["attributes"], &[]);
    run.succeeded();
    let device = ffi::ACL_MEM_LOCATION_TYPE_DEVICE.to_string();
    let host = ffi::ACL_MEM_LOCATION_TYPE_HOST.to_string();
    // Device memory of device 3 (aclrtMalloc HUGE_FIRST: 2 MiB pages).
    assert_eq!(run.fields("DEVICE-PTR"), [device.as_str(), "3", "2097152"]);
    assert_eq!(run.fields("PINNED-PTR"), [host.as_str(), "0"]);
    // Plain host memory: ACL does not manage it, the call fails.
    let plain = run.fields("PLAIN-PTR");
    assert_eq!(
        plain[..2],
        [
            "aclrtPointerGetAttributes",
            &ffi::ACL_ERROR_INVALID_PARAM.to_string()
        ]
    );
    assert!(plain[2].contains("not memory ACL manages"), "{}", plain[2]);
    #[cfg(all(
        kvferry_acl_has = "aclrtHostRegister",
        kvferry_acl_has = "aclrtHostUnregister"
    ))]
    {
        // Registered host memory is host memory.
        assert_eq!(run.fields("REGISTERED-PTR"), [host.as_str()]);
        // aclrtHostRegister wants 64 KiB alignment, and says so.
        let unaligned = run.fields("REGISTER-UNALIGNED");
        assert_eq!(
            unaligned[..2],
            [
                "aclrtHostRegister",
                &ffi::ACL_ERROR_RT_ADDR_UNALIGNED.to_string()
            ]
        );
        assert!(unaligned[2].contains("64 KiB aligned"), "{}", unaligned[2]);
    }
}

#[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
#[test]
fn plain_host_memory_can_be_reported_as_unregistered_instead() {
    use kvferry_cann_standin::UNREGISTERED_ENV;
    let run = probe(&["attributes"], &[(UNREGISTERED_ENV, "report")]);
    run.succeeded();
    assert_eq!(
        run.fields("PLAIN-PTR"),
        ["OK", &ffi::ACL_MEM_LOCATION_TYPE_UNREGISTERED.to_string()]
    );
}

#[test]
fn async_copies_run_at_synchronize() {
    let run = probe(&["stream", "1000"], &[]);
    run.succeeded();
    assert_eq!(run.fields("QUEUED"), ["not-run"]);
    assert_eq!(run.fields("SYNC"), ["ok", "equal"]);
    assert_eq!(run.fields("BAD-FLAGS")[0], "aclrtCreateStreamWithConfig");
    let busy = run.fields("DESTROY-BUSY");
    assert_eq!(
        busy[..2],
        [
            "aclrtDestroyStream",
            &ffi::ACL_ERROR_RT_STREAM_NOT_COMPLETE.to_string()
        ]
    );
    assert!(run.has("DONE"));
}

#[cfg(kvferry_acl_has = "aclrtMemcpyBatch")]
#[test]
fn a_batch_copy_moves_every_entry() {
    let run = probe(&["batch"], &[]);
    run.succeeded();
    assert_eq!(run.fields("FAIL-INDEX"), ["none"]);
    assert_eq!(run.fields("BATCH"), ["equal"]);
    let wrong = run.fields("WRONG-LOCATION");
    assert_eq!(wrong[0], "aclrtMemcpyBatch");
    assert!(wrong[2].contains("entry 2"), "{}", wrong[2]);
    assert_eq!(run.fields("WRONG-LOCATION-INDEX"), ["2"]);
}

#[test]
fn a_thread_without_a_device_fails_until_it_sets_one() {
    let run = probe(&["worker-thread"], &[]);
    run.succeeded();
    let refused = run.fields("ACL-ERROR");
    assert_eq!(
        refused[..2],
        ["aclrtMalloc", &ffi::ACL_ERROR_RT_CONTEXT_NULL.to_string()]
    );
    assert!(
        refused[2].contains("no device is set on this thread"),
        "{}",
        refused[2]
    );
    // After aclrtSetCurrentContext with the main thread's context (device 2).
    assert_eq!(run.fields("WORKER-DEVICE"), ["2"]);
}

/// Same-host IPC: export in one process, import in another.
#[cfg(all(
    kvferry_acl_has = "aclrtIpcMemGetExportKey",
    kvferry_acl_has = "aclrtIpcMemSetImportPid",
    kvferry_acl_has = "aclrtIpcMemImportByKey",
    kvferry_acl_has = "aclrtIpcMemClose",
    kvferry_acl_has = "aclrtPointerGetAttributes"
))]
mod ipc {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, ChildStdin, ChildStdout, Stdio};

    use super::{Run, ffi, probe_command};

    /// A running probe whose stdin and stdout the test drives; killed on drop so a
    /// failing test leaves no process behind.
    struct Interactive {
        child: Child,
        stdin: Option<ChildStdin>,
        stdout: BufReader<ChildStdout>,
    }

    impl Interactive {
        fn spawn(args: &[&str]) -> Self {
            let mut child = probe_command(args, &[])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn the probe");
            let stdin = child.stdin.take();
            let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
            Self {
                child,
                stdin,
                stdout,
            }
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        /// The fields of the next line, which must start with `tag`.
        fn expect_line(&mut self, tag: &str) -> Vec<String> {
            let mut line = String::new();
            self.stdout.read_line(&mut line).expect("read the probe");
            let mut parts = line.trim_end().split('\t').map(str::to_owned);
            assert_eq!(parts.next().as_deref(), Some(tag), "line: {line:?}");
            parts.collect()
        }

        fn send(&mut self, line: &str) {
            let stdin = self.stdin.as_mut().expect("stdin open");
            writeln!(stdin, "{line}").expect("write to the probe");
            stdin.flush().expect("flush");
        }

        /// Closes stdin and collects the rest of the output and the exit code.
        fn finish(mut self) -> Run {
            self.stdin.take();
            let mut stdout = String::new();
            for line in (&mut self.stdout).lines() {
                stdout.push_str(&line.expect("read the probe"));
                stdout.push('\n');
            }
            let status = self.child.wait().expect("wait for the probe");
            Run {
                code: status.code(),
                stdout,
                stderr: String::new(),
            }
        }
    }

    impl Drop for Interactive {
        fn drop(&mut self) {
            // Already exited when finish() ran: kill then fails, harmlessly.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn device_memory_exported_in_one_process_is_imported_in_another() {
        // Importers start first: the exporter must name the allowed pid.
        let mut allowed = Interactive::spawn(&["ipc-import", "1"]);
        let mut refused = Interactive::spawn(&["ipc-import", "2"]);
        allowed.expect_line("PID");
        refused.expect_line("PID");
        let allowed_pid = allowed.pid().to_string();
        let mut exporter = Interactive::spawn(&["ipc-export", "1048576", "allow", &allowed_pid]);
        let key = exporter.expect_line("KEY").remove(0);

        // A process the exporter did not allow is refused.
        refused.send(&key);
        let run = refused.finish();
        let (function, code, message) = run.acl_error();
        assert_eq!(function, "aclrtIpcMemImportByKey");
        assert_eq!(code, ffi::ACL_ERROR_RT_NO_PERMISSION);
        assert!(message.contains("aclrtIpcMemSetImportPid"), "{message}");

        // The allowed one maps it, sees device memory of device 0 holding the
        // exporter's bytes, and writes into it.
        allowed.send(&key);
        let run = allowed.finish();
        run.succeeded();
        assert_eq!(
            run.fields("IMPORTED-PTR"),
            [ffi::ACL_MEM_LOCATION_TYPE_DEVICE.to_string().as_str(), "0"]
        );
        assert_eq!(run.fields("PATTERN"), ["equal"]);
        // From another device, only asynchronous device-to-device copies.
        let direct = run.fields("DIRECT-D2H");
        assert_eq!(
            direct[..2],
            [
                "aclrtMemcpy",
                &ffi::ACL_ERROR_RT_FEATURE_NOT_SUPPORT.to_string()
            ]
        );
        assert!(direct[2].contains("imported on device 1"), "{}", direct[2]);
        assert_eq!(
            run.fields("IMPORT-TWICE")[1],
            ffi::ACL_ERROR_RT_IPC_ERROR.to_string()
        );

        // The exporter sees the importer's one-sided write.
        exporter.send("close");
        let run = exporter.finish();
        run.succeeded();
        assert_eq!(run.fields("HEAD"), ["IMPORTER-WROTE-1"]);
    }

    #[test]
    fn an_export_without_pid_validation_admits_any_process() {
        // The importer on the exporter's device (0): direct copies work too.
        let mut importer = Interactive::spawn(&["ipc-import", "0"]);
        importer.expect_line("PID");
        let mut exporter = Interactive::spawn(&["ipc-export", "8192", "nocheck"]);
        let key = exporter.expect_line("KEY").remove(0);
        importer.send(&key);
        let run = importer.finish();
        run.succeeded();
        assert_eq!(run.fields("PATTERN"), ["equal"]);
        assert_eq!(run.fields("DIRECT-D2H"), ["SUCCEEDED"]);
        exporter.send("done");
        exporter.finish().succeeded();
    }

    #[test]
    fn an_unknown_ipc_key_fails() {
        for key in ["kvfsi:/kvfsi-0-0:0:4096", "not-a-key"] {
            let mut importer = Interactive::spawn(&["ipc-import", "1"]);
            importer.expect_line("PID");
            importer.send(key);
            let (function, code, message) = importer.finish().acl_error();
            assert_eq!(function, "aclrtIpcMemImportByKey");
            assert_eq!(code, ffi::ACL_ERROR_RT_IPC_ERROR);
            assert!(message.contains("unknown IPC key"), "{message}");
        }
    }
}

#[test]
fn an_injected_copy_failure_names_function_code_and_message() {
    let run = probe(&["copies", "3"], &[(FAIL_ENV, "memcpy:3")]);
    assert_eq!(run.fields("COPY"), ["1", "ok"]);
    assert!(run.stdout.contains("COPY\t2\tok"));
    let (function, code, message) = run.acl_error();
    assert_eq!(function, "aclrtMemcpy");
    assert_eq!(code, ffi::ACL_ERROR_RT_SYS_DMA);
    assert!(
        message.contains("injected failure of aclrtMemcpy call #3"),
        "{message}"
    );
    assert_eq!(
        run.fields("DISPLAY")[0],
        format!("aclrtMemcpy failed: ACL error 507013 (ACL_ERROR_RT_SYS_DMA): {message}")
    );
}

#[test]
fn an_injected_code_is_reported_as_given() {
    let run = probe(&["copies", "1"], &[(FAIL_ENV, "aclrtMalloc:1=207018")]);
    let (function, code, message) = run.acl_error();
    assert_eq!((function.as_str(), code), ("aclrtMalloc", 207_018));
    assert!(message.contains("aclrtMalloc call #1"), "{message}");
}

#[cfg(kvferry_acl_has = "aclrtStreamAbort")]
#[test]
fn an_injected_async_copy_failure_surfaces_at_synchronize() {
    let run = probe(&["stream", "1000"], &[(FAIL_ENV, "memcpy_async:2")]);
    let (function, code, message) = run.acl_error();
    assert_eq!(function, "aclrtSynchronizeStreamWithTimeout");
    assert_eq!(code, ffi::ACL_ERROR_RT_SYS_DMA);
    assert!(message.contains("aclrtMemcpyAsync call #2"), "{message}");
    // The stream was aborted and destroyed after the failure.
    assert!(run.has("ABORTED") && run.has("DONE"), "{}", run.stdout);
}

#[cfg(kvferry_acl_has = "aclrtStreamAbort")]
#[test]
fn an_injected_timeout_leaves_the_work_queued_until_aborted() {
    use kvferry_cann_standin::TIMEOUT_ENV;
    let run = probe(&["stream", "150"], &[(TIMEOUT_ENV, "1")]);
    let (function, code, message) = run.acl_error();
    assert_eq!(function, "aclrtSynchronizeStreamWithTimeout");
    assert_eq!(code, ffi::ACL_ERROR_RT_STREAM_SYNC_TIMEOUT);
    assert!(message.contains("aclrtStreamAbort"), "{message}");
    // The synchronize waited out its timeout.
    let waited: u64 = run.fields("SYNC-MS")[0].parse().expect("ms");
    assert!(waited >= 140, "waited {waited} ms");
    // After aclrtStreamAbort the stream is empty: it synchronises and is destroyed.
    assert!(run.has("ABORTED") && run.has("DONE"), "{}", run.stdout);
}

#[cfg(kvferry_acl_has = "aclrtMemcpyBatch")]
#[test]
fn an_injected_batch_failure_reports_the_failed_entry() {
    let run = probe(&["batch"], &[(FAIL_ENV, "memcpy_batch:1")]);
    assert_eq!(run.fields("FAIL-INDEX"), ["2"]);
    let (function, code, message) = run.acl_error();
    assert_eq!(function, "aclrtMemcpyBatch");
    assert_eq!(code, ffi::ACL_ERROR_RT_SYS_DMA);
    assert!(message.contains("at entry 2 of 4"), "{message}");
}

#[test]
fn a_malformed_injection_spec_stops_the_test_loudly() {
    let run = probe(&["copies", "1"], &[(FAIL_ENV, "memcopy:1")]);
    assert_ne!(run.code, Some(0));
    assert_ne!(run.code, Some(2));
    assert!(
        run.stderr
            .contains("KVF_STANDIN_FAIL=memcopy:1 is malformed"),
        "{}",
        run.stderr
    );
}
