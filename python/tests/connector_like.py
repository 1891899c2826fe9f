"""Creates the engine the way the vllm-ascend Mooncake connectors do: the
environment first, then one engine per process behind a lock, imported from
`mooncake.engine` at that moment, initialized with (ip, "P2PHANDSHAKE",
"ascend", device_name), then register_memory and batch reads. Run with
KVFERRY_AS_MOONCAKE=1; prints one JSON line describing what it got."""

import ctypes
import json
import os
import threading


class GlobalTE:
    def __init__(self):
        self.transfer_engine = None
        self.lock = threading.Lock()

    def get_transfer_engine(self, hostname, device_name):
        if self.transfer_engine is None:
            with self.lock:
                if self.transfer_engine is None:
                    try:
                        from mooncake.engine import TransferEngine  # type: ignore
                    except ImportError as e:
                        raise ImportError("Please install mooncake") from e
                    self.transfer_engine = TransferEngine()
                    device_name = device_name if device_name is not None else ""
                    ret = self.transfer_engine.initialize(hostname, "P2PHANDSHAKE", "ascend", device_name)
                    if ret != 0:
                        raise RuntimeError(f"TransferEngine initialization failed with ret_value: {ret}")
        return self.transfer_engine


def main():
    # What the connector writes before creating the engine (ms).
    os.environ["ASCEND_TRANSFER_TIMEOUT"] = str(int(4.096 * 2**20 * 7 // 1000 + 3000))
    te = GlobalTE().get_transfer_engine("127.0.0.1", None)
    import mooncake.engine

    # A second engine stands in for the prefill side.
    from mooncake.engine import TransferEngine

    prefill = TransferEngine()
    assert prefill.initialize("127.0.0.1", "P2PHANDSHAKE", "ascend", "") == 0
    kv = ctypes.create_string_buffer(b"K" * 4096 + b"V" * 4096, 8192)
    assert prefill.register_memory(ctypes.addressof(kv), 8192) == 0
    dst = ctypes.create_string_buffer(8192)
    assert te.register_memory(ctypes.addressof(dst), 8192) == 0
    remote = f"127.0.0.1:{prefill.get_rpc_port()}"
    rc = te.batch_transfer_sync_read(
        remote,
        [ctypes.addressof(dst), ctypes.addressof(dst) + 4096],
        [ctypes.addressof(kv) + 4096, ctypes.addressof(kv)],
        [4096, 4096],
    )
    print(
        json.dumps(
            {
                "module": mooncake.engine.__name__,
                "class_module": type(te).__module__,
                "kvferry": bool(getattr(mooncake.engine, "__kvferry__", False)),
                "rc": rc,
                "swapped": dst.raw == b"V" * 4096 + b"K" * 4096,
            }
        )
    )


if __name__ == "__main__":
    main()
