"""The ctypes declarations against include/kvferry.h: every function the
header declares has a signature in kvferry._ffi.SIGNATURES that matches it
parameter by parameter, and nothing else; the status codes and constants
match; versions agree."""

import ctypes
import re
from pathlib import Path

import pytest

import kvferry
from kvferry import _ffi, _topology_ffi

HEADER_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "include" / "kvferry.h",  # a checkout
    Path(__file__).resolve().parents[1] / "rust" / "include" / "kvferry.h",  # an sdist
]


@pytest.fixture(scope="module")
def header():
    for path in HEADER_CANDIDATES:
        if path.is_file():
            return path.read_text()
    pytest.skip("include/kvferry.h is not next to these tests")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def declarations(header):
    """name -> (return type, [parameter types]) for every kvf_ function."""
    body = re.sub(r"^\s*#[^\n]*", "", strip_comments(header), flags=re.M)
    out = {}
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(kvf_\w+)\s*\(([^)]*)\)\s*;", body):
        ret, name, params = " ".join(m.group(1).split()), m.group(2), m.group(3)
        types = []
        for p in params.split(","):
            p = " ".join(p.split())
            if p in ("void", ""):
                continue
            # Drop the parameter name: the last identifier.
            t = re.sub(r"\b\w+$", "", p).strip()
            types.append(t.replace(" *", "*").replace("* ", "*"))
        out[name] = (ret.replace(" *", "*"), types)
    return out


# The ctypes type each C type must be declared as. Pointers to bytes may be
# c_char_p (so bytes objects pass straight through).
SCALARS = {
    "void": None,
    "int32_t": ctypes.c_int32,
    "kvf_status": ctypes.c_int32,
    "uint16_t": ctypes.c_uint16,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
}


def expected(ctype):
    """The set of ctypes types acceptable for C type `ctype`."""
    t = ctype.replace("const ", "").strip()
    if t in SCALARS:
        return {SCALARS[t]}
    if t in ("char*", "uint8_t*"):
        return {ctypes.c_char_p}
    if t in ("struct kvf_engine*", "struct kvf_config*"):
        return {ctypes.c_void_p}
    if t in ("struct kvf_engine**", "struct kvf_config**"):
        return {ctypes.POINTER(ctypes.c_void_p)}
    if t.replace("const ", "") in _topology_ffi.STRUCT_POINTERS:
        return {_topology_ffi.STRUCT_POINTERS[t]}
    if t == "void*":
        # The Python lists of the `_pylists` calls (through a ctypes.PyDLL).
        return {ctypes.py_object}
    if t == "struct kvf_python_api*":
        # Its address (kvferry._ffi.PythonApi; fields checked below).
        return {ctypes.c_void_p}
    if ctype.startswith("const ") and t == "uint64_t*":
        # A batch's input columns go as the int address of an array('Q')
        # (_ffi.u64_columns): void * has the same ABI as uint64_t *.
        return {ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p}
    if t.endswith("*") and t[:-1] in SCALARS:
        return {ctypes.POINTER(SCALARS[t[:-1]])}
    raise AssertionError(f"the test does not know C type {ctype!r}: teach it")


def test_header_parses(header):
    decls = declarations(header)
    assert len(decls) >= 30, f"only {len(decls)} declarations parsed: the parser broke"
    assert decls["kvf_batch_wait"] == ("kvf_status", ["const struct kvf_engine*", "uint64_t", "uint64_t"])


def test_every_declared_function_has_a_signature(header):
    missing = sorted(set(declarations(header)) - set(_ffi.SIGNATURES))
    assert not missing, f"declared in kvferry.h but not in kvferry/_ffi.py SIGNATURES: {missing}"


def test_no_signature_without_declaration(header):
    extra = sorted(set(_ffi.SIGNATURES) - set(declarations(header)))
    assert not extra, f"in SIGNATURES but not declared in kvferry.h: {extra}"


def test_signatures_match_declarations(header):
    problems = []
    for name, (ret, params) in declarations(header).items():
        if name not in _ffi.SIGNATURES:
            continue
        restype, argtypes = _ffi.SIGNATURES[name]
        if restype not in expected(ret):
            problems.append(f"{name}: returns {ret}, declared restype {restype}")
        if len(argtypes) != len(params):
            problems.append(f"{name}: {len(params)} parameters in C, {len(argtypes)} argtypes")
            continue
        for i, (c, py) in enumerate(zip(params, argtypes)):
            if py not in expected(c):
                problems.append(f"{name}: parameter {i} is {c}, argtype {py}")
    assert not problems, "\n".join(problems)


def test_loaded_functions_carry_the_signatures():
    lib, pylists = _ffi.load(), _ffi.pylists()
    assert pylists is not None, "CPython with a GIL runs these tests: the list fast path must load"
    for name, (restype, argtypes) in _ffi.SIGNATURES.items():
        fn = getattr(pylists if name in _ffi.PYLISTS_FUNCTIONS else lib, name)
        assert fn.restype == restype, name
        assert list(fn.argtypes) == list(argtypes), name


def test_python_api_struct_matches_header(header):
    body = re.search(r"typedef struct kvf_python_api \{(.*?)\} kvf_python_api;", strip_comments(header), re.S)
    assert body, "no struct kvf_python_api in the header"
    # Function pointers `ret (*name)(params);`, then object pointers `const void *name;`.
    fields = re.findall(r"\(\*(\w+)\)\(|\bvoid \*(\w+);", body.group(1))
    functions = [f for f, _ in fields if f]
    objects = [o for f, o in fields if not f]
    assert [f or o for f, o in fields] == functions + objects, "object fields come after the functions"
    assert tuple(functions) == tuple(f for f, _ in _ffi.PYTHON_API_FIELDS)
    assert tuple(objects) == tuple(f for f, _ in _ffi.PYTHON_API_OBJECTS) == ("true_object", "false_object")
    assert [f for f, _ in _ffi.PythonApi._fields_] == functions + objects
    # Every function field is a function of the running interpreter's C API.
    for _, fn in _ffi.PYTHON_API_FIELDS:
        getattr(ctypes.pythonapi, fn)
    # PyLong_AsUnsignedLong stands for a uint64_t conversion: LP64 only.
    assert ctypes.sizeof(ctypes.c_ulong) == 8


def test_status_codes_match_header(header):
    enum = re.search(r"enum kvf_status[^{]*\{(.*?)\};", strip_comments(header), re.S)
    assert enum, "no enum kvf_status in the header"
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"KVF_STATUS_(\w+)\s*=\s*(-?\d+)", enum.group(1))}
    assert codes == {s.name: s.value for s in kvferry.Status}


def test_status_strings_come_from_the_library():
    lib = _ffi.load()
    for s in kvferry.Status:
        text = lib.kvf_status_str(s.value).decode()
        assert text and text != "unknown status", s
    assert lib.kvf_status_str(12345).decode() == "unknown status"


def test_constants_match_header(header):
    defines = dict(re.findall(r"#define (KVF_\w+) (\S+)", header))
    assert int(defines["KVF_OP_READ"]) == _ffi.KVF_OP_READ == kvferry.READ
    assert int(defines["KVF_OP_WRITE"]) == _ffi.KVF_OP_WRITE == kvferry.WRITE
    assert defines["KVF_WAIT_FOREVER"] == "UINT64_MAX" and _ffi.KVF_WAIT_FOREVER == 2**64 - 1
    version = ".".join(defines[f"KVF_VERSION_{p}"] for p in ("MAJOR", "MINOR", "PATCH"))
    assert version == kvferry.library_version() == kvferry.__version__


def test_python_version_matches_cargo():
    root = Path(__file__).resolve().parents[2]
    cargo = root / "Cargo.toml"
    if not cargo.is_file():
        pytest.skip("not in a checkout")
    ws = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"', cargo.read_text(), re.S)
    pyproject = (root / "python" / "pyproject.toml").read_text()
    py = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    assert ws.group(1) == py.group(1) == kvferry.__version__
