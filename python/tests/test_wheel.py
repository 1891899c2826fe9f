"""The wheel, as a cluster installs it: `pip wheel ./python` carries the
library, and a fresh virtual environment without Rust, without this source
tree and without network access installs it and runs the two-process
example of docs/python.md."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python.md"


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
    return out


@pytest.mark.skipif(not (ROOT / "python" / "pyproject.toml").is_file(), reason="not in the source tree")
def test_wheel_installs_in_a_fresh_venv_and_runs_the_docs_example(tmp_path):
    # The same cargo profile as the rest of the run (scripts/test-python:
    # debug, already built), so this costs seconds, not a release build.
    env = dict(os.environ)
    env.setdefault("KVFERRY_CARGO_PROFILE", "debug")
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT / "python")], env=env)
    (wheel,) = wheels.glob("kvferry-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "kvferry/libkvferry.so" in z.namelist()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KVFERRY_", "PYTHON"))}
    clean["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"  # no cargo: the wheel must not need it
    run([str(py), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check", str(wheel)], env=clean)

    section = DOC.read_text().split("## Two processes, Mooncake's API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    work = tmp_path / "elsewhere"  # not the source tree: only the installed copy can be imported
    work.mkdir()
    (work / "two_process.py").write_text(code)
    out = run([str(py), "two_process.py"], cwd=work, env=clean)
    assert "prefill: notification 'block 0 written' from decode-0" in out.stdout
    assert re.search(r"decode: pulled 16 blocks of 65536 bytes from 127\.0\.0\.1:\d+: ok", out.stdout)
    where = run(
        [str(py), "-c", "import kvferry, sys; print(kvferry.__file__, sys.version_info[:2])"], cwd=work, env=clean
    )
    assert str(venv) in where.stdout
