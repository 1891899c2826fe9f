//! TEST SUPPORT ONLY: runs one ACL scenario in its own process, for the
//! stand-in tests (`tests/standin.rs`), which spawn it with the environment
//! of the scenario (`KVFERRY_ACL_LIBRARY`, `KVF_STANDIN_*`).
//!
//! It loads ACL with `Acl::load()`, as kvferry does, and prints what happened,
//! one fact per line. Exit codes: 0 the scenario ran; 2 an ACL call failed
//! (the last lines are `ACL-ERROR\t<function>\t<code>\t<message>` and
//! `DISPLAY\t<error>`); 3 bad usage; 101 an assertion failed (a panic).

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::c_void;
use std::io::Write;
use std::process::ExitCode;
use std::ptr;

use kvferry_ascend_sys::{Acl, AclError, ffi};

/// Pattern byte `i` of the memory a scenario fills.
fn pattern(i: usize, seed: u8) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(seed)
}

fn patterned(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| pattern(i, seed)).collect()
}

/// Device memory from `aclrtMalloc` (or an IPC import), `len` bytes at `ptr`.
#[derive(Clone, Copy)]
struct Dev {
    ptr: *mut c_void,
    len: usize,
}

impl Dev {
    /// The address `offset` bytes in, checked against the length.
    fn at(self, offset: usize, len: usize) -> *mut c_void {
        assert!(
            offset + len <= self.len,
            "probe bug: {offset}+{len} past {}",
            self.len
        );
        self.ptr.wrapping_byte_add(offset)
    }
}

fn init(acl: &Acl) -> Result<(), AclError> {
    // SAFETY: aclInit accepts a null config path.
    match unsafe { acl.aclInit(ptr::null()) } {
        Err(e) if e.code() == Some(ffi::ACL_ERROR_REPEAT_INITIALIZE) => Ok(()),
        other => other,
    }
}

fn set_device(acl: &Acl, device: i32) -> Result<(), AclError> {
    // SAFETY: takes a plain integer.
    unsafe { acl.aclrtSetDevice(device) }
}

fn malloc(acl: &Acl, len: usize) -> Result<Dev, AclError> {
    let mut ptr = ptr::null_mut();
    // SAFETY: `ptr` is a valid place for the address.
    unsafe { acl.aclrtMalloc(&mut ptr, len, ffi::ACL_MEM_MALLOC_HUGE_FIRST) }?;
    Ok(Dev { ptr, len })
}

fn free(acl: &Acl, dev: Dev) -> Result<(), AclError> {
    // SAFETY: `dev` came from aclrtMalloc and is freed once.
    unsafe { acl.aclrtFree(dev.ptr) }
}

fn h2d(acl: &Acl, dst: Dev, offset: usize, src: &[u8]) -> Result<(), AclError> {
    let to = dst.at(offset, src.len());
    // SAFETY: `to` has src.len() bytes of device memory (Dev::at checked);
    // `src` is a live host slice of that length.
    unsafe {
        acl.aclrtMemcpy(
            to,
            src.len(),
            src.as_ptr().cast(),
            src.len(),
            ffi::ACL_MEMCPY_HOST_TO_DEVICE,
        )
    }
}

fn d2h(acl: &Acl, src: Dev, offset: usize, dst: &mut [u8]) -> Result<(), AclError> {
    let from = src.at(offset, dst.len());
    // SAFETY: `from` has dst.len() bytes of device memory (Dev::at checked);
    // `dst` is a live, exclusively borrowed host slice of that length.
    unsafe {
        acl.aclrtMemcpy(
            dst.as_mut_ptr().cast(),
            dst.len(),
            from,
            dst.len(),
            ffi::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    }
}

#[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
fn attributes(acl: &Acl, ptr: *const c_void) -> Result<ffi::aclrtPtrAttributes, AclError> {
    let mut attrs = ffi::aclrtPtrAttributes::default();
    // SAFETY: `attrs` is a valid place for the attributes; ACL only inspects
    // the address `ptr`, it does not read through it.
    unsafe { acl.aclrtPointerGetAttributes(ptr, &mut attrs) }?;
    Ok(attrs)
}

fn create_stream(acl: &Acl, flags: u32) -> Result<ffi::aclrtStream, AclError> {
    let mut stream = ptr::null_mut();
    // SAFETY: `stream` is a valid place for the handle.
    unsafe { acl.aclrtCreateStreamWithConfig(&mut stream, 0, flags) }?;
    Ok(stream)
}

fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    // A probe whose stdout is gone has no one to report to.
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

/// `load`: which functions the library exports.
fn load(acl: &Acl) -> Result<(), AclError> {
    say(format!("LOADED\t{}", acl.library().display()));
    say(format!("MISSING\t{}", acl.missing_functions().join(",")));
    Ok(())
}

/// `roundtrip`: init, devices, context, host -> device -> device -> host.
fn roundtrip(acl: &Acl) -> Result<(), AclError> {
    // SAFETY: aclInit accepts a null config path.
    unsafe { acl.aclInit(ptr::null()) }?;
    let again = init_twice(acl);
    say(format!("INIT-AGAIN\t{again}"));
    let mut count = 0u32;
    // SAFETY: `count` is a valid place for the count.
    unsafe { acl.aclrtGetDeviceCount(&mut count) }?;
    say(format!("DEVICES\t{count}"));
    set_device(acl, 1)?;
    let mut device = -1;
    // SAFETY: `device` is a valid place for the id.
    unsafe { acl.aclrtGetDevice(&mut device) }?;
    say(format!("DEVICE\t{device}"));
    let mut context = ptr::null_mut();
    // SAFETY: `context` is a valid place for the handle.
    unsafe { acl.aclrtGetCurrentContext(&mut context) }?;
    assert!(!context.is_null());

    let len = 1 << 20 | 123; // not a multiple of any page
    let a = malloc(acl, len)?;
    let b = malloc(acl, len)?;
    let data = patterned(len, 3);
    h2d(acl, a, 0, &data)?;
    // SAFETY: a and b each have `len` bytes of device memory.
    unsafe { acl.aclrtMemcpy(b.ptr, len, a.ptr, len, ffi::ACL_MEMCPY_DEVICE_TO_DEVICE) }?;
    let mut back = vec![0u8; len];
    d2h(acl, b, 0, &mut back)?;
    say(format!(
        "ROUNDTRIP\t{}",
        if back == data { "equal" } else { "DIFFERENT" }
    ));

    // A partial copy at an offset inside the allocation.
    h2d(acl, b, 1000, b"kvferry")?;
    let mut word = [0u8; 7];
    d2h(acl, b, 1000, &mut word)?;
    say(format!("OFFSET\t{}", String::from_utf8_lossy(&word)));

    // count > destMax is refused before anything moves.
    // SAFETY: valid host and device pointers; ACL rejects the sizes.
    let too_big = unsafe {
        acl.aclrtMemcpy(
            back.as_mut_ptr().cast(),
            16,
            b.ptr,
            32,
            ffi::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    };
    report_expected("COUNT-OVER-DESTMAX", too_big);
    // A kind that contradicts the pointers is refused.
    // SAFETY: valid pointers; the kind is wrong on purpose and ACL rejects it.
    let wrong_kind = unsafe {
        acl.aclrtMemcpy(
            b.ptr,
            16,
            back.as_ptr().cast(),
            16,
            ffi::ACL_MEMCPY_DEVICE_TO_HOST,
        )
    };
    report_expected("WRONG-KIND", wrong_kind);

    free(acl, a)?;
    free(acl, b)?;
    // SAFETY: `a` was just freed: ACL must refuse a second free.
    let double_free = unsafe { acl.aclrtFree(a.ptr) };
    report_expected("DOUBLE-FREE", double_free);
    // SAFETY: no arguments.
    unsafe { acl.aclFinalize() }?;
    say("DONE");
    Ok(())
}

fn init_twice(acl: &Acl) -> String {
    // SAFETY: aclInit accepts a null config path.
    match unsafe { acl.aclInit(ptr::null()) } {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("{}", e.code().unwrap_or_default()),
    }
}

/// Prints the outcome of a call that is expected to fail.
fn report_expected(tag: &str, result: Result<(), AclError>) {
    match result {
        Ok(()) => say(format!("{tag}\tSUCCEEDED")),
        Err(e) => say(format!(
            "{tag}\t{}\t{}\t{e}",
            e.function().unwrap_or("-"),
            e.code().unwrap_or_default()
        )),
    }
}

#[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
/// `attributes`: device vs pinned host vs registered host vs plain host.
fn pointer_attributes(acl: &Acl) -> Result<(), AclError> {
    init(acl)?;
    set_device(acl, 3)?;
    let dev = malloc(acl, 4096)?;
    let attrs = attributes(acl, dev.at(100, 1))?;
    say(format!(
        "DEVICE-PTR\t{}\t{}\t{}",
        attrs.location.type_, attrs.location.id, attrs.pageSize
    ));

    let mut pinned = ptr::null_mut();
    // SAFETY: `pinned` is a valid place for the address.
    unsafe { acl.aclrtMallocHost(&mut pinned, 8192) }?;
    let attrs = attributes(acl, pinned)?;
    say(format!(
        "PINNED-PTR\t{}\t{}",
        attrs.location.type_, attrs.location.id
    ));
    // Pinned host memory is ordinary host memory to the CPU.
    // SAFETY: `pinned` has 8192 writable bytes from aclrtMallocHost.
    unsafe { pinned.cast::<u8>().write_bytes(0xab, 8192) };

    let plain = vec![0u8; 4096];
    match attributes(acl, plain.as_ptr().cast()) {
        Ok(attrs) => say(format!("PLAIN-PTR\tOK\t{}", attrs.location.type_)),
        Err(e) => say(format!(
            "PLAIN-PTR\t{}\t{}\t{e}",
            e.function().unwrap_or("-"),
            e.code().unwrap_or_default()
        )),
    }

    #[cfg(all(
        kvferry_acl_has = "aclrtHostRegister",
        kvferry_acl_has = "aclrtHostUnregister"
    ))]
    register_host(acl)?;

    // SAFETY: `pinned` came from aclrtMallocHost and is freed once.
    unsafe { acl.aclrtFreeHost(pinned) }?;
    free(acl, dev)?;
    say("DONE");
    Ok(())
}

/// `attributes`, continued: host registration and its alignment rule.
#[cfg(all(
    kvferry_acl_has = "aclrtHostRegister",
    kvferry_acl_has = "aclrtHostUnregister"
))]
fn register_host(acl: &Acl) -> Result<(), AclError> {
    // aclrtHostRegister wants 64 KiB alignment; a Vec's buffer rarely has it.
    let mut backing = vec![0u8; 256 << 10];
    let base = backing.as_mut_ptr();
    let aligned = base.wrapping_add(base.align_offset(64 << 10));
    let unaligned = aligned.wrapping_add(4096);
    let mut mapped = ptr::null_mut();
    // SAFETY: `unaligned` has 64 KiB of live host memory after it (256 KiB
    // backing, at most 64 KiB + 4 KiB in); `mapped` is a valid out place.
    let refused = unsafe {
        acl.aclrtHostRegister(
            unaligned.cast(),
            64 << 10,
            ffi::ACL_HOST_REGISTER_MAPPED,
            &mut mapped,
        )
    };
    report_expected("REGISTER-UNALIGNED", refused);
    // SAFETY: `aligned` has 64 KiB of live host memory after it (see above),
    // and stays alive until aclrtHostUnregister below.
    unsafe {
        acl.aclrtHostRegister(
            aligned.cast(),
            64 << 10,
            ffi::ACL_HOST_REGISTER_MAPPED,
            &mut mapped,
        )
    }?;
    let attrs = attributes(acl, aligned.cast())?;
    say(format!("REGISTERED-PTR\t{}", attrs.location.type_));
    // SAFETY: `aligned` was registered above.
    unsafe { acl.aclrtHostUnregister(aligned.cast()) }?;
    drop(backing);
    Ok(())
}

/// `stream <timeout-ms>`: async copies queue, run at synchronize; on failure
/// (injected copy failure or timeout) the stream is aborted and destroyed.
fn stream(acl: &Acl, timeout: i32) -> Result<(), AclError> {
    init(acl)?;
    set_device(acl, 0)?;
    // Unknown flag bits are refused.
    let mut bogus = ptr::null_mut();
    // SAFETY: `bogus` is a valid place for the handle.
    let refused = unsafe { acl.aclrtCreateStreamWithConfig(&mut bogus, 0, 0x8000_0000) };
    report_expected("BAD-FLAGS", refused);
    let stream = create_stream(acl, ffi::ACL_STREAM_FAST_LAUNCH | ffi::ACL_STREAM_FAST_SYNC)?;
    let len = 64 << 10;
    let dev = malloc(acl, len)?;
    let data = patterned(len, 11);
    let mut back = vec![0u8; len];
    let half = len / 2;
    // SAFETY: `dev` has `len` bytes; `data` and `back` are host buffers of
    // `len` bytes that outlive the synchronize (or abort) below.
    unsafe {
        acl.aclrtMemcpyAsync(
            dev.ptr,
            len,
            data.as_ptr().cast(),
            len,
            ffi::ACL_MEMCPY_HOST_TO_DEVICE,
            stream,
        )?;
        acl.aclrtMemcpyAsync(
            back.as_mut_ptr().cast(),
            half,
            dev.ptr,
            half,
            ffi::ACL_MEMCPY_DEVICE_TO_HOST,
            stream,
        )?;
        acl.aclrtMemcpyAsync(
            back.as_mut_ptr().wrapping_add(half).cast(),
            half,
            dev.at(half, half),
            half,
            ffi::ACL_MEMCPY_DEVICE_TO_HOST,
            stream,
        )?;
    }
    say(format!(
        "QUEUED\t{}",
        if back.iter().all(|&b| b == 0) {
            "not-run"
        } else {
            "ALREADY-RAN"
        }
    ));
    // Destroying a stream with queued work is refused.
    // SAFETY: `stream` is live; ACL refuses because it has queued tasks.
    let early = unsafe { acl.aclrtDestroyStream(stream) };
    report_expected("DESTROY-BUSY", early);
    let started = std::time::Instant::now();
    // SAFETY: `stream` is live.
    let synced = unsafe { acl.aclrtSynchronizeStreamWithTimeout(stream, timeout) };
    say(format!("SYNC-MS\t{}", started.elapsed().as_millis()));
    match &synced {
        Ok(()) => say(format!(
            "SYNC\tok\t{}",
            if back == data { "equal" } else { "DIFFERENT" }
        )),
        #[cfg(kvferry_acl_has = "aclrtStreamAbort")]
        Err(e) => {
            say(format!("SYNC\tfailed\t{e}"));
            // SAFETY: `stream` is live.
            unsafe { acl.aclrtStreamAbort(stream) }?;
            // SAFETY: `stream` is live and now empty.
            unsafe { acl.aclrtSynchronizeStreamWithTimeout(stream, timeout) }?;
            say("ABORTED");
        }
        // Without aclrtStreamAbort the queued work cannot be discarded.
        #[cfg(not(kvferry_acl_has = "aclrtStreamAbort"))]
        Err(_) => return synced,
    }
    // SAFETY: `stream` is live and empty; destroyed once.
    unsafe { acl.aclrtDestroyStream(stream) }?;
    free(acl, dev)?;
    say("DONE");
    synced
}

/// `batch`: aclrtMemcpyBatch with host -> device, device -> device (across
/// devices), device -> host entries under three attributes.
#[cfg(kvferry_acl_has = "aclrtMemcpyBatch")]
fn batch(acl: &Acl) -> Result<(), AclError> {
    init(acl)?;
    set_device(acl, 0)?;
    let len = 4096;
    let on0 = malloc(acl, len)?;
    set_device(acl, 1)?;
    let on1 = malloc(acl, len)?;
    let input = patterned(len, 5);
    let mut output = vec![0u8; len];
    let loc = |type_, id| ffi::aclrtMemLocation { id, type_ };
    let host = loc(ffi::ACL_MEM_LOCATION_TYPE_HOST, 0);
    let mut attrs = [
        ffi::aclrtMemcpyBatchAttr {
            dstLoc: loc(ffi::ACL_MEM_LOCATION_TYPE_DEVICE, 0),
            srcLoc: host,
            ..Default::default()
        },
        ffi::aclrtMemcpyBatchAttr {
            dstLoc: loc(ffi::ACL_MEM_LOCATION_TYPE_DEVICE, 1),
            srcLoc: loc(ffi::ACL_MEM_LOCATION_TYPE_DEVICE, 0),
            ..Default::default()
        },
        ffi::aclrtMemcpyBatchAttr {
            dstLoc: host,
            srcLoc: loc(ffi::ACL_MEM_LOCATION_TYPE_DEVICE, 1),
            ..Default::default()
        },
    ];
    // Two host -> device entries (two halves), one device -> device, one
    // device -> host: attrs[0] for entries 0-1, attrs[1] for 2, attrs[2] for 3.
    let half = len / 2;
    let mut dsts = [
        on0.ptr,
        on0.at(half, half),
        on1.ptr,
        output.as_mut_ptr().cast(),
    ];
    let mut srcs = [
        input.as_ptr() as *mut c_void,
        input.as_ptr().wrapping_add(half) as *mut c_void,
        on0.ptr,
        on1.ptr,
    ];
    let mut sizes = [half, half, len, len];
    let mut dest_maxs = sizes;
    let mut indexes = [0usize, 2, 3];
    let mut fail_index = 0usize;
    // SAFETY: every array has the length given; each dst/src has sizes[i]
    // bytes of the memory its attribute says; all outlive the call, which is
    // synchronous.
    let result = unsafe {
        acl.aclrtMemcpyBatch(
            dsts.as_mut_ptr(),
            dest_maxs.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            dsts.len(),
            attrs.as_mut_ptr(),
            indexes.as_mut_ptr(),
            attrs.len(),
            &mut fail_index,
        )
    };
    let fail = if fail_index == usize::MAX {
        "none".to_owned()
    } else {
        fail_index.to_string()
    };
    say(format!("FAIL-INDEX\t{fail}"));
    result?;
    say(format!(
        "BATCH\t{}",
        if output == input {
            "equal"
        } else {
            "DIFFERENT"
        }
    ));

    // A wrong device id in a location is refused, naming the entry.
    attrs[1].dstLoc.id = 5;
    // SAFETY: as above.
    let wrong = unsafe {
        acl.aclrtMemcpyBatch(
            dsts.as_mut_ptr(),
            dest_maxs.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            dsts.len(),
            attrs.as_mut_ptr(),
            indexes.as_mut_ptr(),
            attrs.len(),
            &mut fail_index,
        )
    };
    report_expected("WRONG-LOCATION", wrong);
    say(format!("WRONG-LOCATION-INDEX\t{fail_index}"));
    free(acl, on1)?;
    set_device(acl, 0)?;
    free(acl, on0)?;
    say("DONE");
    Ok(())
}

/// `copies <n>`: n host -> device copies; with KVF_STANDIN_FAIL one fails.
fn copies(acl: &Acl, n: usize) -> Result<(), AclError> {
    init(acl)?;
    set_device(acl, 0)?;
    let dev = malloc(acl, 4096)?;
    let data = patterned(4096, 1);
    for i in 1..=n {
        let copied = h2d(acl, dev, 0, &data);
        if copied.is_err() {
            free(acl, dev)?;
        }
        copied?;
        say(format!("COPY\t{i}\tok"));
    }
    free(acl, dev)?;
    say("DONE");
    Ok(())
}

/// `worker-thread`: a thread that did not set the device cannot allocate;
/// after aclrtSetCurrentContext with the main thread's context it can.
fn worker_thread(acl: &Acl) -> Result<(), AclError> {
    init(acl)?;
    set_device(acl, 2)?;
    let mut context = ptr::null_mut();
    // SAFETY: `context` is a valid place for the handle.
    unsafe { acl.aclrtGetCurrentContext(&mut context) }?;
    let context = context as usize; // a handle, sent to the worker
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), AclError> {
                let refused = malloc(acl, 4096).map(|_| ());
                let Err(e) = refused else {
                    say("WORKER-MALLOC\tSUCCEEDED");
                    return Ok(());
                };
                say(format!(
                    "ACL-ERROR\t{}\t{}\t{}",
                    e.function().unwrap_or("-"),
                    e.code().unwrap_or_default(),
                    message_of(&e)
                ));
                // SAFETY: `context` came from aclrtGetCurrentContext.
                unsafe { acl.aclrtSetCurrentContext(context as ffi::aclrtContext) }?;
                let dev = malloc(acl, 4096)?;
                let mut device = -1;
                // SAFETY: `device` is a valid place for the id.
                unsafe { acl.aclrtGetDevice(&mut device) }?;
                say(format!("WORKER-DEVICE\t{device}"));
                free(acl, dev)
            })
            .join()
            .unwrap_or_else(|_| panic!("worker thread panicked"))
    })?;
    say("DONE");
    Ok(())
}

/// Same-host IPC scenarios (CANN releases with the IPC-by-key functions).
#[cfg(all(
    kvferry_acl_has = "aclrtIpcMemGetExportKey",
    kvferry_acl_has = "aclrtIpcMemSetImportPid",
    kvferry_acl_has = "aclrtIpcMemImportByKey",
    kvferry_acl_has = "aclrtIpcMemClose",
    kvferry_acl_has = "aclrtPointerGetAttributes"
))]
mod ipc {
    use std::ffi::{CStr, CString, c_char};
    use std::io::BufRead;
    use std::ptr;

    use kvferry_ascend_sys::{Acl, AclError, ffi};

    use super::{
        Dev, attributes, create_stream, d2h, free, h2d, init, malloc, patterned, report_expected,
        say, set_device,
    };

    fn read_line() -> String {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        line.trim().to_owned()
    }

    /// `ipc-export <len> [nocheck] [allow <pid>...]`: allocates, fills with the
    /// pattern, exports, allows the pids, prints `KEY\t<key>`, then waits for a
    /// line on stdin and prints the first 16 bytes (which an importer may have
    /// written) before freeing.
    pub(crate) fn ipc_export(acl: &Acl, args: &[String]) -> Result<(), AclError> {
        let len: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1 << 20);
        let nocheck = args.iter().any(|a| a == "nocheck");
        let mut pids: Vec<i32> = args
            .iter()
            .skip_while(|a| *a != "allow")
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        init(acl)?;
        set_device(acl, 0)?;
        let dev = malloc(acl, len)?;
        h2d(acl, dev, 0, &patterned(len, 9))?;
        // CANN documents the key length as fixed at 65.
        let mut key: [c_char; 65] = [0; 65];
        let flags = if nocheck {
            u64::from(ffi::ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION)
        } else {
            u64::from(ffi::ACL_RT_IPC_MEM_EXPORT_FLAG_DEFAULT)
        };
        // SAFETY: `dev` has `len` bytes; `key` has room for key.len() bytes.
        unsafe { acl.aclrtIpcMemGetExportKey(dev.ptr, len, key.as_mut_ptr(), key.len(), flags) }?;
        if !pids.is_empty() {
            // SAFETY: `key` is the NUL-terminated key just made; `pids` has
            // pids.len() entries.
            unsafe { acl.aclrtIpcMemSetImportPid(key.as_ptr(), pids.as_mut_ptr(), pids.len()) }?;
        }
        // SAFETY: aclrtIpcMemGetExportKey wrote a NUL-terminated key.
        let text = unsafe { CStr::from_ptr(key.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        say(format!("KEY\t{text}"));
        let command = read_line();
        let mut head = [0u8; 16];
        d2h(acl, dev, 0, &mut head)?;
        say(format!(
            "HEAD\t{}",
            String::from_utf8_lossy(&head).replace(|c: char| !c.is_ascii_graphic(), ".")
        ));
        if command == "close" {
            // SAFETY: `key` is this process's export key.
            unsafe { acl.aclrtIpcMemClose(key.as_ptr()) }?;
        }
        free(acl, dev)?;
        say("DONE");
        Ok(())
    }

    /// `ipc-import <device>`: reads a key from stdin, imports it, checks the
    /// pattern, writes a marker at offset 0, reads it back, closes.
    pub(crate) fn ipc_import(acl: &Acl, args: &[String]) -> Result<(), AclError> {
        let device: i32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
        init(acl)?;
        set_device(acl, device)?;
        say(format!("PID\t{}", std::process::id()));
        let key = read_line();
        let Ok(key) = CString::new(key) else {
            say("BAD-KEY");
            return Ok(());
        };
        let mut ptr = ptr::null_mut();
        // SAFETY: `ptr` is a valid place for the address; `key` is NUL-terminated.
        unsafe {
            acl.aclrtIpcMemImportByKey(
                &mut ptr,
                key.as_ptr(),
                u64::from(ffi::ACL_RT_IPC_MEM_IMPORT_FLAG_DEFAULT),
            )
        }?;
        let len: usize = key
            .to_str()
            .ok()
            .and_then(|k| k.rsplit(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let imported = Dev { ptr, len };
        let attrs = attributes(acl, ptr)?;
        say(format!(
            "IMPORTED-PTR\t{}\t{}",
            attrs.location.type_, attrs.location.id
        ));
        // Memory imported from another device's process moves only by
        // asynchronous device-to-device copies (CANN's documented rule), so
        // read and write it through a buffer on this device.
        let local = malloc(acl, len)?;
        let stream = create_stream(acl, ffi::ACL_STREAM_FAST_LAUNCH | ffi::ACL_STREAM_FAST_SYNC)?;
        // SAFETY: `local` and `imported` each have `len` bytes of device memory.
        unsafe {
            acl.aclrtMemcpyAsync(
                local.ptr,
                len,
                imported.ptr,
                len,
                ffi::ACL_MEMCPY_DEVICE_TO_DEVICE,
                stream,
            )
        }?;
        // SAFETY: `stream` is live.
        unsafe { acl.aclrtSynchronizeStreamWithTimeout(stream, 5000) }?;
        let mut seen = vec![0u8; len];
        d2h(acl, local, 0, &mut seen)?;
        say(format!(
            "PATTERN\t{}",
            if seen == patterned(len, 9) {
                "equal"
            } else {
                "DIFFERENT"
            }
        ));
        // A direct device -> host copy of the imported memory: fine on the
        // exporter's device, refused from another device.
        let mut head = [0u8; 16];
        report_expected("DIRECT-D2H", d2h(acl, imported, 0, &mut head));
        // A second import of the same key is refused: import once, reuse.
        let mut again = ptr::null_mut();
        // SAFETY: as above.
        let twice = unsafe { acl.aclrtIpcMemImportByKey(&mut again, key.as_ptr(), 0) };
        report_expected("IMPORT-TWICE", twice);
        // A one-sided write into the exporter's memory.
        let marker = b"IMPORTER-WROTE-1";
        h2d(acl, local, 0, marker)?;
        // SAFETY: both have at least marker.len() bytes of device memory.
        unsafe {
            acl.aclrtMemcpyAsync(
                imported.ptr,
                marker.len(),
                local.ptr,
                marker.len(),
                ffi::ACL_MEMCPY_DEVICE_TO_DEVICE,
                stream,
            )
        }?;
        // SAFETY: `stream` is live.
        unsafe { acl.aclrtSynchronizeStreamWithTimeout(stream, 5000) }?;
        // SAFETY: `stream` is live and empty; destroyed once.
        unsafe { acl.aclrtDestroyStream(stream) }?;
        free(acl, local)?;
        // SAFETY: `key` was imported above; closed once.
        unsafe { acl.aclrtIpcMemClose(key.as_ptr()) }?;
        say("DONE");
        Ok(())
    }
}

fn message_of(error: &AclError) -> String {
    match error {
        AclError::Call { message, .. } => message.clone(),
        AclError::Unavailable { reason, .. } => reason.clone(),
        AclError::NotFound { dlerror, .. } => dlerror.clone(),
        _ => String::new(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(scenario) = args.first() else {
        eprintln!("usage: acl-standin-probe <scenario> [args]");
        return ExitCode::from(3);
    };
    let acl = match Acl::load() {
        Ok(acl) => acl,
        Err(e) => {
            say(format!("LOAD-ERROR\t{e}"));
            return ExitCode::from(2);
        }
    };
    let rest = &args[1..];
    let result = match scenario.as_str() {
        "load" => load(&acl),
        "roundtrip" => roundtrip(&acl),
        #[cfg(kvferry_acl_has = "aclrtPointerGetAttributes")]
        "attributes" => pointer_attributes(&acl),
        "stream" => stream(
            &acl,
            rest.first().and_then(|t| t.parse().ok()).unwrap_or(1000),
        ),
        #[cfg(kvferry_acl_has = "aclrtMemcpyBatch")]
        "batch" => batch(&acl),
        "copies" => copies(&acl, rest.first().and_then(|n| n.parse().ok()).unwrap_or(3)),
        "worker-thread" => worker_thread(&acl),
        #[cfg(all(
            kvferry_acl_has = "aclrtIpcMemGetExportKey",
            kvferry_acl_has = "aclrtIpcMemSetImportPid",
            kvferry_acl_has = "aclrtIpcMemImportByKey",
            kvferry_acl_has = "aclrtIpcMemClose",
            kvferry_acl_has = "aclrtPointerGetAttributes"
        ))]
        "ipc-export" => ipc::ipc_export(&acl, rest),
        #[cfg(all(
            kvferry_acl_has = "aclrtIpcMemGetExportKey",
            kvferry_acl_has = "aclrtIpcMemSetImportPid",
            kvferry_acl_has = "aclrtIpcMemImportByKey",
            kvferry_acl_has = "aclrtIpcMemClose",
            kvferry_acl_has = "aclrtPointerGetAttributes"
        ))]
        "ipc-import" => ipc::ipc_import(&acl, rest),
        other => {
            eprintln!("unknown scenario {other}");
            return ExitCode::from(3);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format!(
                "ACL-ERROR\t{}\t{}\t{}",
                e.function().unwrap_or("-"),
                e.code().unwrap_or_default(),
                message_of(&e)
            ));
            say(format!("DISPLAY\t{e}"));
            ExitCode::from(2)
        }
    }
}
