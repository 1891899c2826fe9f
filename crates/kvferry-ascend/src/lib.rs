//! Ascend NPU memory for kvferry.
//!
//! [`AscendRuntime`] implements kvferry's [`DeviceRuntime`](kvferry::DeviceRuntime)
//! over ACL (`libascendcl.so`, loaded at run time through
//! kvferry-ascend-sys): engines created with it register `"npu:N"` memory
//! (checked with `aclrtPointerGetAttributes`, exported with an IPC key for
//! same-host peers), find device memory for `"*"`, stage device memory
//! through pinned host buffers for tcp, and reach same-host peers' device
//! memory with the `ascend-ipc` transport (IPC-mapped device-to-device
//! copies on a stream, synchronised under the transfer deadline, aborted on
//! timeout). Every ACL failure is a [`kvferry::Error::Device`] with the ACL
//! function, its code and `aclGetRecentErrMsg`.
//!
//! ```no_run
//! use kvferry::{Engine, EngineConfig};
//! use kvferry_ascend::AscendRuntime;
//!
//! # fn main() -> Result<(), kvferry::Error> {
//! // Fails with "Ascend runtime not found: ..." on a machine without CANN.
//! let ascend = AscendRuntime::load()?;
//! let engine = Engine::new(EngineConfig::new().device_runtime(ascend.clone()))?;
//! let kv = ascend.alloc_device(0, 64 << 20)?; // or torch_npu's KV cache
//! // SAFETY: `kv` outlives the registration (unregistered below).
//! unsafe { engine.register_memory(kv.addr(), kv.len(), "npu:0")? };
//! engine.unregister_memory(kv.addr())?;
//! # Ok(())
//! # }
//! ```
//!
//! docs/ascend.md says what the CANN stand-in used by the tests proves and
//! what only an Ascend machine does.

mod acl;
mod ipc;
mod optional;
mod runtime;

pub use runtime::{
    AscendConfig, AscendRuntime, AscendStats, DEVICE_ALIGNMENT, DeviceBuffer, IPC_ENV,
};
