"""The examples of docs/python.md run as printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"


def run_example(tmp_path, heading):
    """Runs the first python block after `heading` of docs/python.md as a
    script in a fresh interpreter; its completed process."""
    if not DOC.is_file():
        pytest.skip("docs/python.md is not next to these tests")
    section = DOC.read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same kvferry as this test
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


def test_two_process_example(tmp_path):
    out = run_example(tmp_path, "## Two processes, Mooncake's API")
    assert "prefill: notification 'block 0 written' from decode-0" in out.stdout
    assert re.search(r"decode: pulled 16 blocks of 65536 bytes from 127\.0\.0\.1:\d+: ok", out.stdout)


def test_failure_example(tmp_path):
    out = run_example(tmp_path, "### When a call fails")
    lines = out.stdout.splitlines()
    assert re.fullmatch(
        r"transfer_sync_read: op 0: local range \[0x[0-9a-f]+, \+4096\) is not inside one registered region", lines[0]
    )
    assert lines[1] == "<Status.LOCAL_OUT_OF_RANGE: -22>"
    assert "kvferry: transfer_sync_read: op 0: local range" in out.stderr  # the logger's WARNING


def test_pythonic_example(tmp_path):
    pytest.importorskip("numpy")
    out = run_example(tmp_path, "## The Pythonic API (`kvferry.Engine`)")
    assert re.fullmatch(r"prefill: b'layer 2 done' from 127\.0\.0\.1:\d+\n", out.stdout)
