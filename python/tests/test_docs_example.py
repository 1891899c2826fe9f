"""The two-process example of docs/python.md runs as printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"


def test_two_process_example(tmp_path):
    if not DOC.is_file():
        pytest.skip("docs/python.md is not next to these tests")
    text = DOC.read_text()
    section = text.split("## Two processes, Mooncake's API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "two_process.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same kvferry as this test
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "prefill: notification 'block 0 written' from decode-0" in out.stdout
    assert re.search(r"decode: pulled 16 blocks of 65536 bytes from 127\.0\.0\.1:\d+: ok", out.stdout)
