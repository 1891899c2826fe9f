//! NPU memory: `kvf_config_use_ascend`.

use kvferry_core::Status;

use crate::boundary::ffi;
use crate::config::kvf_config;
use crate::handle;

/// Makes engines created from `config` handle Ascend NPU memory: memory
/// registered as `"npu:N"` (or found to be device memory for `"*"`) is
/// checked and exported for same-host peers, moved device-to-device with
/// same-host peers (ascend-ipc) and staged through pinned host buffers over
/// tcp otherwise (`ASCEND_BUFFER_POOL` = `count:MiB`).
///
/// Loads the ACL runtime now: `KVFERRY_ACL_LIBRARY` if set, else
/// `libascendcl.so` from the loader's path (source CANN's `set_env.sh`).
/// Where there is none: `KVF_STATUS_UNSUPPORTED`, `kvf_last_error()` says
/// "Ascend runtime not found: ...", and the config is unchanged (an engine
/// made from it handles host memory only). A malformed
/// `KVFERRY_ASCEND_IPC` (not a boolean: docs/configuration.md) is
/// `KVF_STATUS_INVALID_ARGUMENT` naming it. A library built without the
/// `ascend` feature always answers `KVF_STATUS_UNSUPPORTED`.
///
/// # Safety
/// `config` is NULL or from `kvf_config_new`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvf_config_use_ascend(config: *mut kvf_config) -> Status {
    ffi!({
        // SAFETY: forwarded to the caller.
        let c = unsafe { handle::config_mut(config) }?;
        *c = with_ascend(c.clone())?;
        Ok(Status::Ok)
    })
}

#[cfg(feature = "ascend")]
fn with_ascend(
    c: kvferry_core::EngineConfig,
) -> Result<kvferry_core::EngineConfig, kvferry_core::Error> {
    Ok(c.device_runtime(kvferry_ascend::AscendRuntime::load()?))
}

#[cfg(not(feature = "ascend"))]
fn with_ascend(
    _: kvferry_core::EngineConfig,
) -> Result<kvferry_core::EngineConfig, kvferry_core::Error> {
    Err(kvferry_core::Error::Unsupported {
        what: "this libkvferry was built without Ascend support (cargo feature \"ascend\")".into(),
    })
}
