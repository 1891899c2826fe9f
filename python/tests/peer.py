"""A peer process for the tests: a kvferry.TransferEngine with one registered
buffer, driven over a multiprocessing pipe. Started with the spawn method, as
every process of a serving cluster is its own interpreter."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import time


def serve(conn, protocol: str, size: int, hostname: str = "127.0.0.1") -> None:
    import kvferry

    te = kvferry.TransferEngine()
    rc = te.initialize(hostname, "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        conn.send(("error", kvferry.last_error()))
        return
    buf = ctypes.create_string_buffer(size)
    addr = ctypes.addressof(buf)
    if te.register_memory(addr, size) != 0:
        conn.send(("error", kvferry.last_error()))
        return
    conn.send(("ready", te.get_session_id(), addr, size, os.getpid()))
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            break
        if cmd == "fill":
            offset, data = args
            ctypes.memmove(addr + offset, data, len(data))
            conn.send(True)
        elif cmd == "get":
            offset, n = args
            conn.send(ctypes.string_at(addr + offset, n))
        elif cmd == "notifies":
            # Waits (bounded) until `count` notifications arrived.
            count, timeout = args
            got, deadline = [], time.monotonic() + timeout
            while len(got) < count and time.monotonic() < deadline:
                got += [tuple(n) for n in te.get_notifies()]
                if len(got) < count:
                    time.sleep(0.005)
            conn.send(got)
        elif cmd == "notify":
            session, message = args
            conn.send((te.send_notify(session, message), kvferry.last_error()))
        elif cmd == "read_from":
            # The peer reads from another engine into its own buffer.
            session, local_off, remote, n = args
            conn.send(te.transfer_sync_read(session, addr + local_off, remote, n))
        elif cmd == "stop":
            break
    te.close()


class Peer:
    """Handle on a running peer process."""

    def __init__(self, protocol: str = "tcp", size: int = 8 << 20):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, protocol, size), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            self.kill()
            raise RuntimeError("the peer process did not start within 60 s")
        try:
            msg = self.conn.recv()
        except EOFError:
            self.kill()
            raise RuntimeError(f"the peer process died while starting (exit code {self.proc.exitcode})") from None
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"the peer process failed: {msg[1]}")
        _, self.session, self.addr, self.size, self.pid = msg

    def ask(self, *cmd, timeout: float = 30.0):
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise RuntimeError(f"the peer did not answer {cmd[0]!r} within {timeout} s")
        return self.conn.recv()

    def fill(self, offset: int, data: bytes) -> None:
        self.ask("fill", offset, data)

    def get(self, offset: int, n: int) -> bytes:
        return self.ask("get", offset, n)

    def notifies(self, count: int, timeout: float = 5.0) -> list:
        return self.ask("notifies", count, timeout, timeout=timeout + 30)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(10)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
