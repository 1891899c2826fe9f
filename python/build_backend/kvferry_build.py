"""The PEP 517 build backend of the kvferry Python package.

Small on purpose, and with no build requirements (it works offline): it
builds libkvferry.so with cargo, then writes the wheel itself, a zip with a
.dist-info folder. The wheel is platform-specific (`py3-none-<platform>`): it
carries the library, and the package is pure Python over ctypes, so one
wheel serves every Python 3.8+ on that platform.

Where the library comes from, first match wins:
  KVFERRY_PREBUILT_LIBRARY=/path/libkvferry.so   bundle that file, no cargo
  the Rust workspace: ./rust (inside an sdist) or .. (a git checkout), or
  KVFERRY_SOURCE_DIR; built with `cargo build --release -p kvferry-capi`
  (KVFERRY_CARGO_PROFILE=debug for a debug build; CARGO_TARGET_DIR honoured).
The bundled copy is stripped of debug info when `strip` is available
(KVFERRY_STRIP=0 keeps it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # python/
PACKAGE = "kvferry"
LIBRARY = "libkvferry.so"
PTH = "kvferry-mooncake.pth"
# Rust sources an sdist carries, relative to the workspace root.
WORKSPACE_FILES = ("Cargo.toml", "Cargo.lock", "cbindgen.toml", "clippy.toml")
WORKSPACE_DIRS = ("crates", "include", "benches")


# -- metadata ------------------------------------------------------------------


def _project() -> dict:
    """The [project] table of pyproject.toml (tomllib when the Python has it,
    else the few keys this backend reads, by pattern)."""
    text = (HERE / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+

        return tomllib.loads(text)["project"]
    except ImportError:
        pass
    section = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.S | re.M)
    body = section.group(1) if section else ""
    out: dict = {}
    for key in ("name", "version", "description", "requires-python"):
        m = re.search(rf'^{key}\s*=\s*"([^"]*)"', body, re.M)
        if m:
            out[key] = m.group(1)
    out["optional-dependencies"] = {}
    extras = re.search(r"^\[project\.optional-dependencies\]\s*$(.*?)(?=^\[|\Z)", text, re.S | re.M)
    if extras:
        for name, items in re.findall(r"^(\w[\w-]*)\s*=\s*\[(.*?)\]", extras.group(1), re.S | re.M):
            out["optional-dependencies"][name] = re.findall(r'"([^"]+)"', items)
    return out


def _dist_name(project: dict) -> str:
    return re.sub(r"[-_.]+", "_", project["name"]).lower()


def _metadata(project: dict) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
        f"Summary: {project.get('description', '')}",
        "License: Apache-2.0",
    ]
    if "requires-python" in project:
        lines.append(f"Requires-Python: {project['requires-python']}")
    for extra, reqs in sorted(project.get("optional-dependencies", {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        for req in reqs:
            lines.append(f'Requires-Dist: {req}; extra == "{extra}"')
    readme = HERE / "README.md"
    if readme.is_file():
        lines.append("Description-Content-Type: text/markdown")
        return "\n".join(lines) + "\n\n" + readme.read_text(encoding="utf-8")
    return "\n".join(lines) + "\n"


def _platform_tag() -> str:
    override = os.environ.get("KVFERRY_WHEEL_PLATFORM", "").strip()
    if override:
        return override
    return re.sub(r"[-.]", "_", sysconfig.get_platform())


def _wheel_file(tag: str) -> str:
    return "\n".join(
        [
            "Wheel-Version: 1.0",
            "Generator: kvferry_build",
            "Root-Is-Purelib: false",
            f"Tag: {tag}",
            "",
        ]
    )


# -- the library ---------------------------------------------------------------


def _workspace() -> Path | None:
    env = os.environ.get("KVFERRY_SOURCE_DIR")
    candidates = [Path(env)] if env else [HERE / "rust", HERE.parent]
    for root in candidates:
        if (root / "Cargo.toml").is_file() and (root / "crates" / "kvferry-capi").is_dir():
            return root.resolve()
    return None


def _cargo() -> str:
    found = shutil.which("cargo")
    if found:
        return found
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin" / "cargo"
    if home.is_file():
        return str(home)
    raise RuntimeError(
        "kvferry: building the library needs cargo (Rust), which is not on PATH nor in ~/.cargo/bin. "
        "Install Rust (https://rustup.rs), or set KVFERRY_PREBUILT_LIBRARY to a built libkvferry.so."
    )


def _build_library() -> Path:
    prebuilt = os.environ.get("KVFERRY_PREBUILT_LIBRARY", "").strip()
    if prebuilt:
        path = Path(prebuilt)
        if not path.is_file():
            raise RuntimeError(f"kvferry: KVFERRY_PREBUILT_LIBRARY={prebuilt} is not a file")
        return path
    root = _workspace()
    if root is None:
        raise RuntimeError(
            "kvferry: cannot find the Rust sources (a Cargo.toml with crates/kvferry-capi) in "
            f"{HERE / 'rust'} or {HERE.parent}; set KVFERRY_SOURCE_DIR to the kvferry checkout, "
            "or KVFERRY_PREBUILT_LIBRARY to a built libkvferry.so."
        )
    profile = os.environ.get("KVFERRY_CARGO_PROFILE", "release").strip() or "release"
    cmd = [_cargo(), "build", "-p", "kvferry-capi", "--message-format=json-render-diagnostics"]
    cmd += ["--release"] if profile == "release" else ([] if profile == "debug" else ["--profile", profile])
    print(f"kvferry: {' '.join(cmd[1:])} in {root}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kvferry: cargo build failed (exit {proc.returncode}); its errors are above")
    # The cdylib's path, from cargo's own report (right for any CARGO_TARGET_DIR).
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg.get("target", {}).get("kind", []):
            for name in msg.get("filenames", []):
                if name.endswith(".so"):
                    return Path(name)
    raise RuntimeError("kvferry: cargo reported no libkvferry.so")


def _stripped_copy(lib: Path, dest: Path) -> None:
    shutil.copyfile(lib, dest)
    if os.environ.get("KVFERRY_STRIP", "1") == "0":
        return
    strip = shutil.which("strip")
    if strip:
        subprocess.run([strip, "--strip-debug", str(dest)], check=False)


# -- wheel writing ---------------------------------------------------------------


class _Wheel:
    """A wheel being written: files plus RECORD with sha256 of each."""

    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self.records: list[str] = []

    def add(self, arcname: str, data: bytes, executable: bool = False) -> None:
        info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (0o755 if executable else 0o644) << 16
        self.zip.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        self.records.append(f"{arcname},sha256={digest},{len(data)}")

    def close(self, record_name: str) -> None:
        self.records.append(f"{record_name},,")
        info = zipfile.ZipInfo(record_name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        self.zip.writestr(info, "\n".join(self.records) + "\n")
        self.zip.close()


def _package_files():
    pkg = HERE / PACKAGE
    for path in sorted(pkg.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path.relative_to(HERE).as_posix(), path.read_bytes()


def _write_dist_info(wheel: _Wheel, project: dict, tag: str) -> str:
    dist_info = f"{_dist_name(project)}-{project['version']}.dist-info"
    wheel.add(f"{dist_info}/METADATA", _metadata(project).encode())
    wheel.add(f"{dist_info}/WHEEL", _wheel_file(tag).encode())
    wheel.add(f"{dist_info}/top_level.txt", f"{PACKAGE}\n".encode())
    return dist_info


def _tag() -> str:
    return f"py3-none-{_platform_tag()}"


# -- PEP 517 hooks ---------------------------------------------------------------


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    project = _project()
    dist_info = Path(metadata_directory) / f"{_dist_name(project)}-{project['version']}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(_metadata(project), encoding="utf-8")
    (dist_info / "WHEEL").write_text(_wheel_file(_tag()), encoding="utf-8")
    return dist_info.name


prepare_metadata_for_build_editable = prepare_metadata_for_build_wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    project = _project()
    tag = _tag()
    lib = _build_library()
    name = f"{_dist_name(project)}-{project['version']}-{tag}.whl"
    wheel = _Wheel(Path(wheel_directory) / name)
    for arcname, data in _package_files():
        wheel.add(arcname, data)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / LIBRARY
        _stripped_copy(lib, copy)
        wheel.add(f"{PACKAGE}/{LIBRARY}", copy.read_bytes(), executable=True)
    wheel.add(PTH, (HERE / PTH).read_bytes())
    dist_info = _write_dist_info(wheel, project, tag)
    wheel.close(f"{dist_info}/RECORD")
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """`pip install -e ./python`: the wheel holds a .pth naming python/, and
    the library is built and placed in python/kvferry/ (ignored by git)."""
    project = _project()
    tag = _tag()
    lib = _build_library()
    shutil.copyfile(lib, HERE / PACKAGE / LIBRARY)
    name = f"{_dist_name(project)}-{project['version']}-{tag}.whl"
    wheel = _Wheel(Path(wheel_directory) / name)
    wheel.add("__editable__.kvferry.pth", f"{HERE}\n".encode())
    wheel.add(PTH, (HERE / PTH).read_bytes())
    dist_info = _write_dist_info(wheel, project, tag)
    wheel.close(f"{dist_info}/RECORD")
    return name


def build_sdist(sdist_directory, config_settings=None):
    """A source archive that builds anywhere with Rust: python/ plus the Rust
    workspace under rust/."""
    project = _project()
    base = f"{_dist_name(project)}-{project['version']}"
    name = f"{base}.tar.gz"
    root = _workspace()

    def skip(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if "__pycache__" in parts or "target" in parts or info.name.endswith((".so", ".pyc")):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(Path(sdist_directory) / name, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for entry in ("pyproject.toml", "README.md", PTH, PACKAGE, "build_backend", "tests"):
            if (HERE / entry).exists():
                tar.add(HERE / entry, f"{base}/{entry}", filter=skip)
        if root is not None and root != (HERE / "rust").resolve():
            for entry in WORKSPACE_FILES + WORKSPACE_DIRS:
                if (root / entry).exists():
                    tar.add(root / entry, f"{base}/rust/{entry}", filter=skip)
        elif (HERE / "rust").is_dir():
            tar.add(HERE / "rust", f"{base}/rust", filter=skip)
        pkg_info = io.BytesIO(_metadata(project).encode())
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        info.size = len(pkg_info.getvalue())
        tar.addfile(info, pkg_info)
    return name
