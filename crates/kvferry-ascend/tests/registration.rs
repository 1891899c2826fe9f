//! Registration of NPU memory with the Ascend runtime (the CANN stand-in,
//! loaded by path: no environment needed), in one process.

use std::sync::Arc;

use kvferry::{Engine, EngineConfig, Error, Location, Op};
use kvferry_ascend::{AscendConfig, AscendRuntime};
use kvferry_cann_standin::STANDIN_LIBRARY;

/// The CANN stand-in, or the real runtime named by KVFERRY_TEST_ACL_LIBRARY.
fn library() -> String {
    std::env::var("KVFERRY_TEST_ACL_LIBRARY")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| STANDIN_LIBRARY.to_owned())
}

fn on_standin() -> bool {
    library() == STANDIN_LIBRARY
}

fn runtime(ipc: bool) -> Arc<AscendRuntime> {
    AscendRuntime::with_config(AscendConfig::new().library(library()).ipc(ipc)).unwrap()
}

/// Registers test memory.
fn register(e: &Engine, addr: u64, len: u64, location: &str) -> Result<(), Error> {
    // SAFETY: every buffer these tests register outlives its engine (the
    // engines are dropped before the buffers).
    unsafe { e.register_memory(addr, len, location) }
}

fn engine(rt: &Arc<AscendRuntime>) -> Engine {
    Engine::new(EngineConfig::new().port(0).device_runtime(rt.clone())).unwrap()
}

#[test]
fn a_missing_runtime_is_reported_as_not_found() {
    let e = AscendRuntime::with_config(AscendConfig::new().library("/nonexistent/libascendcl.so"))
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("Ascend runtime not found"), "{e}");
}

#[test]
fn npu_regions_are_checked_exported_and_detected() {
    let rt = runtime(true);
    let count = rt.device_count();
    assert!(
        count >= 2,
        "these tests need two NPUs, the runtime sees {count}"
    );
    let e = engine(&rt);
    let dev = rt.alloc_device(0, 4 << 20).unwrap();
    let mut host = vec![0u8; 1 << 20];
    register(&e, dev.addr(), dev.len(), "npu:0").unwrap();
    let seg = e.segment();
    let r = seg.find(dev.addr(), 1).unwrap();
    assert_eq!(r.location, Location::Npu(0));
    let key = seg.export(dev.addr()).expect("an IPC key in the segment");
    assert!(key.len() < 65, "{key:?}");
    if on_standin() {
        assert!(key.starts_with(b"kvfsi:"), "{key:?}");
    }

    // Host memory is not device memory.
    let err = register(&e, host.as_mut_ptr() as u64, 4096, "npu:0").unwrap_err();
    assert!(
        matches!(&err, Error::Device { function, .. } if function == "aclrtPointerGetAttributes"),
        "{err}"
    );
    assert!(
        err.to_string().contains("not memory ACL allocated"),
        "{err}"
    );
    // Device memory of another device than the location says.
    let other = rt.alloc_device(1, 1 << 20).unwrap();
    let err = register(&e, other.addr(), other.len(), "npu:0").unwrap_err();
    assert!(
        err.to_string().contains("memory of npu:1, not npu:0"),
        "{err}"
    );
    // A device that does not exist.
    let err = register(&e, other.addr(), other.len(), "npu:9").unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }) && err.to_string().contains("8 NPU(s)"),
        "{err}"
    );

    // "*": the runtime says where the memory lives.
    register(&e, other.addr(), other.len(), "*").unwrap();
    register(&e, host.as_mut_ptr() as u64, 4096, "*").unwrap();
    let seg = e.segment();
    assert_eq!(
        seg.find(other.addr(), 1).unwrap().location,
        Location::Npu(1)
    );
    assert_eq!(
        seg.find(host.as_ptr() as u64, 1).unwrap().location,
        Location::Host
    );
    assert!(seg.export(host.as_ptr() as u64).is_none());

    // Unregistering closes the export; the key leaves the segment.
    e.unregister_memory(dev.addr()).unwrap();
    assert!(e.segment().export(dev.addr()).is_none());
    drop(e);
    drop((dev, other));
}

#[test]
fn without_ipc_no_key_is_published() {
    let rt = runtime(false);
    let e = engine(&rt);
    let dev = rt.alloc_device(2, 2 << 20).unwrap();
    register(&e, dev.addr(), dev.len(), "npu:2").unwrap();
    assert!(e.segment().export(dev.addr()).is_none());
    assert_eq!(
        e.segment().find(dev.addr(), 1).unwrap().location,
        Location::Npu(2)
    );
    drop(e);
}

#[test]
fn two_engines_of_one_process_move_npu_memory_staged_over_tcp() {
    let rt = runtime(true);
    let (a, b) = (engine(&rt), engine(&rt));
    let src = rt.alloc_device(3, 1 << 20).unwrap();
    let dst = rt.alloc_device(4, 1 << 20).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    rt.upload(3, src.addr(), &data).unwrap();
    register(&a, dst.addr(), dst.len(), "npu:4").unwrap();
    register(&b, src.addr(), src.len(), "npu:3").unwrap();
    assert_eq!(a.transport_to(b.name()).unwrap(), "local");
    assert_eq!(a.device_transport_to(b.name()).unwrap(), "tcp");
    let ops: Vec<Op> = (0..16)
        .map(|k| Op {
            local: dst.addr() + k * 65536,
            remote: src.addr() + k * 65536,
            len: 65536,
        })
        .collect();
    a.read(b.name(), &ops).unwrap();
    let mut got = vec![0u8; 1 << 20];
    rt.download(4, dst.addr(), &mut got).unwrap();
    assert!(got == data);
    assert_eq!(a.staging_stats().in_use, 0);
    drop((a, b));
}
