"""Opt-in: `from mooncake.engine import TransferEngine` gives kvferry's engine.

Installed at interpreter start-up by `kvferry-mooncake.pth` (which the wheel
puts in site-packages) when `KVFERRY_AS_MOONCAKE=1` is in the environment,
so unmodified code, and the worker processes it spawns, get kvferry. Or call
`kvferry.install_mooncake_alias()` before the first import of mooncake.

Only `mooncake.engine` is redirected. If a real `mooncake` package is
installed, its other modules (`mooncake.store`, ...) stay importable; if not,
an empty `mooncake` package is provided so that `mooncake.engine` resolves.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ENV = "KVFERRY_AS_MOONCAKE"
EXPORTS = ("TransferEngine", "TransferNotify", "TransferOpcode")


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _EngineLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        from . import compat

        for name in EXPORTS:
            setattr(module, name, getattr(compat, name))
        # Mooncake's module advertises its compiled-in transports; kvferry
        # has none of those.
        for flag in ("SUPPORT_CUDA", "SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_MNNVL", "SUPPORT_INTRA_NVLINK"):
            setattr(module, flag, False)
        module.__kvferry__ = True
        module.__doc__ = "kvferry's engine under Mooncake's name (KVFERRY_AS_MOONCAKE)."


class _PackageLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__kvferry__ = True
        module.__doc__ = "Stand-in mooncake package provided by kvferry (KVFERRY_AS_MOONCAKE)."


class MooncakeAliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "mooncake.engine":
            return importlib.util.spec_from_loader(fullname, _EngineLoader(), origin="kvferry.compat")
        if fullname == "mooncake":
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                if finder.find_spec(fullname, path, target) is not None:
                    return None  # a real mooncake package: keep it
            spec = importlib.machinery.ModuleSpec(fullname, _PackageLoader(), origin="kvferry", is_package=True)
            spec.submodule_search_locations = []
            return spec
        return None


def installed() -> bool:
    return any(isinstance(f, MooncakeAliasFinder) for f in sys.meta_path)


def install() -> None:
    """Puts the finder first on `sys.meta_path` (idempotent)."""
    if installed():
        return
    loaded = sys.modules.get("mooncake.engine")
    if loaded is not None and not getattr(loaded, "__kvferry__", False):
        # Too late for this process: the real module is already in use.
        import logging

        logging.getLogger("kvferry").warning(
            "kvferry: mooncake.engine was imported before the kvferry alias was installed; "
            "this process keeps Mooncake's engine"
        )
        return
    sys.meta_path.insert(0, MooncakeAliasFinder())


def install_from_env() -> None:
    """What the .pth file runs at start-up: install only when opted in."""
    if enabled_by_env():
        install()
