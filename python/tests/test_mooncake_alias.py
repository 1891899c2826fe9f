"""KVFERRY_AS_MOONCAKE=1 makes unmodified code that imports
`mooncake.engine` get kvferry's engine: checked in a fresh interpreter running
tests/connector_like.py, which imports exactly as the vllm-ascend connector."""

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import kvferry

HERE = Path(__file__).resolve().parent
PTH = "kvferry-mooncake.pth"


def installed_pth():
    """The .pth the wheel put in site-packages, if this kvferry is installed
    (not imported from the source tree)."""
    site_dir = Path(kvferry.__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    pth = site_dir / PTH
    return pth if site_dir in site_dirs and pth.is_file() else None


def run(code_or_script, env_extra, tmp_path):
    env = dict(os.environ)
    env.pop("KVFERRY_AS_MOONCAKE", None)
    env.update(env_extra)
    if installed_pth():
        cmd = [sys.executable, *code_or_script]
    else:
        # Running from a checkout: process the source tree's .pth the way
        # site-packages would be processed at start-up.
        site_dir = tmp_path / "site"
        site_dir.mkdir(exist_ok=True)
        (site_dir / PTH).write_bytes((HERE.parent / PTH).read_bytes())
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
        boot = f"import site, sys, runpy; site.addsitedir({str(site_dir)!r}); "
        if code_or_script[0] == "-c":
            cmd = [sys.executable, "-c", boot + code_or_script[1]]
        else:
            cmd = [
                sys.executable,
                "-c",
                boot
                + f"sys.argv = [{code_or_script[0]!r}]; runpy.run_path({code_or_script[0]!r}, run_name='__main__')",
            ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_connector_import_gets_kvferry(tmp_path):
    out = run([str(HERE / "connector_like.py")], {"KVFERRY_AS_MOONCAKE": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["module"] == "mooncake.engine"
    assert got["class_module"] == "kvferry.compat"
    assert got["kvferry"] is True
    assert got["rc"] == 0 and got["swapped"] is True


def test_without_the_variable_nothing_changes(tmp_path):
    if importlib.util.find_spec("mooncake") is not None:
        pytest.skip("a real mooncake package is installed here")
    out = run(["-c", "import mooncake.engine"], {}, tmp_path)
    assert out.returncode != 0 and "No module named 'mooncake'" in out.stderr
    out = run(["-c", "import mooncake.engine"], {"KVFERRY_AS_MOONCAKE": "0"}, tmp_path)
    assert out.returncode != 0


def test_alias_exports_mooncake_names(tmp_path):
    code = (
        "from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode\n"
        "import mooncake.engine as m, kvferry\n"
        "assert TransferEngine is kvferry.TransferEngine\n"
        "assert TransferOpcode.Read == 0 and TransferOpcode.Write == 1\n"
        "assert TransferNotify('a', 'b').msg == 'b'\n"
        "assert m.SUPPORT_CUDA is False\n"
        "print('ok')\n"
    )
    out = run(["-c", code], {"KVFERRY_AS_MOONCAKE": "1"}, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_install_from_code(tmp_path):
    code = (
        "import kvferry; kvferry.install_mooncake_alias()\n"
        "from mooncake.engine import TransferEngine; print(TransferEngine.__module__)"
    )
    out = run(["-c", code], {}, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "kvferry.compat", out.stderr


def test_real_mooncake_package_is_kept(tmp_path):
    """With a real `mooncake` package on the path, only mooncake.engine is
    redirected; its other modules stay."""
    fake = tmp_path / "real" / "mooncake"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    (fake / "store.py").write_text("STORE = 'real store'\n")
    (fake / "engine.py").write_text("raise ImportError('the real engine must not load')\n")
    code = (
        "import mooncake, mooncake.store\n"
        "from mooncake.engine import TransferEngine\n"
        "print(mooncake.REAL, mooncake.store.STORE, TransferEngine.__module__)\n"
    )
    env = {
        "KVFERRY_AS_MOONCAKE": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "real"), os.environ.get("PYTHONPATH", "")]),
    }
    out = run(["-c", code], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True real store kvferry.compat"
