"""kvferry.topology: rank mapping and block planning through libkvferry.

- the COMPAT.md section 2 and 3 vectors and worked examples;
- the pull and push mappings against the crate's Python transcription of
  the rules (crates/kvferry-topology/tests/oracle/rules.py, CPython's own
  `random` and `hashlib`) over TP {1..32} x heads {1..64} x PP {1, 2} x the
  three attention kinds, acceptance included;
- plans against a pure-Python transcription of COMPAT.md section 2
  (compat_plan.py) for random layouts, op for op;
- the ctypes declarations against include/kvferry.h;
- every refusal, and `transfer_blocks` between two engines in this process
  with the bytes checked.

Runs against the installed kvferry package, like the rest of the suite.
"""

import array
import ctypes
from pathlib import Path
import importlib.util
import random
import re

import pytest

import compat_plan

import kvferry
from kvferry import Error, Status, topology

from kvferry import _topology_ffi

REPO = Path(__file__).resolve().parents[2]


def make_engine():
    """An engine on 127.0.0.1."""
    return kvferry.Engine(hostname="127.0.0.1")


ORACLE = REPO / "crates" / "kvferry-topology" / "tests" / "oracle" / "rules.py"
HEADER = REPO / "include" / "kvferry.h"


# ---- COMPAT.md section 3 ------------------------------------------------------------

PULL_VECTORS = [
    # P, D, H, attention, S, decode rank lists for "req-0"
    (8, 8, 8, "gqa", 1, [[0], [1], [2], [3], [4], [5], [6], [7]]),
    (8, 4, 8, "gqa", 1, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (8, 4, 4, "gqa", 1, [[1], [3], [5], [7]]),
    (16, 4, 4, "gqa", 1, [[3], [7], [11], [15]]),
    (8, 4, 0, "mla", 1, [[6], [7], [1], [0]]),
    (4, 2, 4, "gqa", 2, [[0, 1, 4, 5], [2, 3, 6, 7]]),
]


def test_request_seed():
    assert topology.request_seed("req-0") == 7753214593136781247


@pytest.mark.parametrize("p,d,h,attention,s,lists", PULL_VECTORS)
def test_pull_vectors(p, d, h, attention, s, lists):
    assert topology.pull_ranks("req-0", p, d, h, attention, s) == lists
    assert topology.prefill_union("req-0", p, d, h, attention, s) == sorted(r for ranks in lists for r in ranks)
    n = topology.pulls_per_rank(p, d, h, attention)
    assert all(len(ranks) == n * s for ranks in lists)


def test_pulls_per_rank_formula():
    assert topology.pulls_per_rank(16, 2, 16) == 8
    assert topology.pulls_per_rank(16, 2, 16, "mla") == 1
    assert topology.pulls_per_rank(32, 4, 8) == 2
    assert topology.pulls_per_rank(8, 4, 4, "GQA") == 1  # any letter case


def test_push_examples():
    # P8 D4 H8: p -> p // 2 at offset p % 2, for every request.
    for q in range(3):
        for p in range(8):
            assert topology.push_targets(8, 4, 8, "gqa", q, p) == ([p // 2], p % 2)
    # P8 D2 H4: even requests from {0,2,4,6}, odd from {1,3,5,7}; p -> p // 4
    # at offset (p // 2) % 2.
    for q in range(4):
        for p in range(8):
            ranks, offset = topology.push_targets(8, 2, 4, "gqa", q, p)
            assert ranks == ([p // 4] if p % 2 == q % 2 else [])
            assert offset == (p // 2) % 2
    # P8 D4 MLA: even requests from ranks 0..3, odd from 4..7, offset 0.
    for q in range(4):
        for p in range(8):
            assert topology.push_targets(8, 4, 1, "mla", q, p) == ([p % 4] if p // 4 == q % 2 else [], 0)


def test_large_shapes_are_sized_by_the_library():
    # More entries than the first buffer guess (4096): the retry path.
    lists = topology.pull_ranks("r", 8192, 8192, 8192, "gqa", 2)
    assert len(lists) == 8192 and lists[5] == [5, 8192 + 5]
    assert topology.prefill_union("r", 8192, 8192, 8192, "gqa", 2) == list(range(2 * 8192))


# ---- against the rules oracle ----------------------------------------------------------


@pytest.fixture(scope="module")
def rules():
    if not ORACLE.is_file():
        pytest.skip("the crate's oracle (crates/kvferry-topology/tests/oracle) is not in this tree")
    spec = importlib.util.spec_from_file_location("kvferry_topology_rules", ORACLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TPS = [1, 2, 4, 8, 16, 32]
HEADS = [1, 2, 4, 8, 16, 64]
REQUEST_IDS = ["req-0", "", "cmpl-0f3c9a", "chatcmpl-é中", "a" * 300, "x-17", "0", "prefill/decode 42"]


def rejects(fn, *args):
    try:
        fn(*args)
    except Error as e:
        assert e.status == Status.INVALID_ARGUMENT and e.message, e
        return True
    return False


@pytest.mark.parametrize("attention", ["gqa", "mla", "sparse"])
def test_mappings_match_the_rules_oracle(rules, attention):
    checked = 0
    for p in TPS:
        for d in TPS:
            for h in HEADS:
                for s in (1, 2):
                    shape = (p, d, h, attention, s)
                    if rules.rejected(*shape):
                        assert rejects(topology.pull_ranks, "r", p, d, h, attention, s), shape
                        assert rejects(topology.push_targets, p, d, h, attention, 0, 0), shape
                        continue
                    for rid in REQUEST_IDS:
                        want = rules.pull_lists(*shape, rid)
                        if want is None:
                            assert rejects(topology.pull_ranks, rid, p, d, h, attention, s), shape
                            break
                        assert topology.pull_ranks(rid, p, d, h, attention, s) == want, (shape, rid)
                        union = sorted({r for ranks in want for r in ranks})
                        assert topology.prefill_union(rid, p, d, h, attention, s) == union, (shape, rid)
                        checked += 1
                    else:
                        assert topology.pulls_per_rank(p, d, h, attention) == rules.pulls_per_rank(p, d, h, attention)
                    if s == 1:  # the push mapping has no stages
                        for q in (0, 1, 2, 5):
                            for rank in range(p):
                                got = topology.push_targets(p, d, h, attention, q, rank)
                                assert got == rules.push_targets(p, d, h, attention, q, rank), (shape, q, rank)
    assert checked > 500


def test_large_shapes_grow_the_pull_buffers(rules):
    # More ranks and decode ranks than the first per-thread buffers hold
    # (256 ranks, 65 offsets): the library sizes them, and the lists still
    # match the oracle; a small shape afterwards too.
    for shape in [(1024, 2, 1024, "gqa", 1), (512, 128, 8, "mla", 2), (128, 128, 4, "gqa", 3)]:
        for rid in REQUEST_IDS[:2]:
            assert topology.pull_ranks(rid, *shape) == rules.pull_lists(*shape, rid), shape
    assert topology.pull_ranks("req-0", 8, 4, 4) == [[1], [3], [5], [7]]


# ---- refusals -----------------------------------------------------------------------------


def test_shape_refusals_carry_the_library_message():
    with pytest.raises(Error) as e:
        topology.pull_ranks("r", 2, 4, 4)
    assert e.value.status == Status.INVALID_ARGUMENT
    assert "prefill tp 2 < decode tp 4" in e.value.message
    with pytest.raises(Error, match="prefill tp 6 and 4 kv heads do not divide one another"):
        topology.pulls_per_rank(6, 2, 4)
    with pytest.raises(Error, match="prefill rank 8 is out of range"):
        topology.push_targets(8, 4, 4, "gqa", 0, 8)
    with pytest.raises(Error, match="prefill_tp 65537 exceeds KVF_TOPOLOGY_MAX_SIZE"):
        topology.pull_ranks("r", 65537, 1, 1)
    with pytest.raises(Error, match="pull rules give"):
        topology.pull_ranks("r", 8, 2, 8, "sparse")


def test_python_argument_errors():
    with pytest.raises(ValueError, match="attention"):
        topology.pull_ranks("r", 8, 4, 4, "mha")
    with pytest.raises(TypeError, match="attention"):
        topology.pulls_per_rank(8, 4, 4, 1)
    with pytest.raises(TypeError, match="prefill_tp"):
        topology.pull_ranks("r", 8.0, 4, 4)
    assert topology.pulls_per_rank(8, 1, 4) == 4  # cached: True must not hit it
    with pytest.raises(TypeError, match="decode_tp"):
        topology.pulls_per_rank(8, True, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        topology.pulls_per_rank(8, 4, -1)
    with pytest.raises(ValueError, match="prefill_pp"):
        topology.pull_ranks("r", 8, 4, 4, "gqa", 1 << 32)
    with pytest.raises(TypeError, match="request_id"):
        topology.pull_ranks(b"r", 8, 4, 4)
    with pytest.raises(ValueError, match="NUL"):
        topology.prefill_union("a\0b", 8, 4, 4)
    with pytest.raises(ValueError, match="request_index"):
        topology.push_targets(8, 4, 4, "gqa", -1, 0)


def test_numpy_integers_wherever_an_int_goes():
    """docs/python.md: wherever an int goes, numpy's integers do too, as
    block ids already did. Shapes, ranks, layouts and plan options raised
    TypeError for them; bools (numpy's too) are still refused."""
    np = pytest.importorskip("numpy")
    i32, i64, u64 = np.int32, np.int64, np.uint64
    assert topology.pulls_per_rank(i64(8), i32(4), u64(4)) == topology.pulls_per_rank(8, 4, 4)
    assert topology.pull_ranks("req-0", i64(8), i64(4), i64(4), "gqa", i32(1)) == topology.pull_ranks("req-0", 8, 4, 4)
    assert topology.prefill_union("req-0", i32(8), i32(4), i32(4), "gqa", i32(2)) == topology.prefill_union(
        "req-0", 8, 4, 4, "gqa", 2
    )
    assert topology.push_targets(i64(8), i64(4), i64(4), "gqa", u64(3), i32(5)) == topology.push_targets(
        8, 4, 4, "gqa", 3, 5
    )
    local = topology.Layout([[(u64(0x100000), i64(256), i64(512))]], i64(64))
    assert (local.num_blocks, type(local.num_blocks)) == (64, int)
    remote = one_cache(64, 0x200000, 256)
    ids = dict(local_ids=[6, 7], remote_ids=[0, 1, 2, 3])
    want = plan_lists(topology.plan_blocks(local, remote, **ids, computed_tokens=32, tokens_per_block=16))
    got = topology.plan_blocks(local, remote, **ids, computed_tokens=i64(32), tokens_per_block=u64(16))
    assert plan_lists(got) == want
    half = one_cache(64, 0x300000, 128)  # a pull of half the block
    want = plan_lists(topology.plan_blocks(local, half, [1], [2], pulls=2, offset_index=1))
    assert plan_lists(topology.plan_blocks(local, half, [1], [2], pulls=i32(2), offset_index=u64(1))) == want
    with pytest.raises(TypeError, match="decode_tp"):
        topology.pulls_per_rank(8, np.bool_(True), 4)
    with pytest.raises(TypeError, match="num_blocks"):
        topology.Layout([[(0x100000, 256)]], np.bool_(True))
    with pytest.raises(ValueError, match="num_kv_heads"):
        topology.pulls_per_rank(8, 4, i64(-1))


# ---- the header -------------------------------------------------------------------------


def _declarations(header):
    text = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", header, flags=re.S))
    text = re.sub(r"^\s*#[^\n]*", "", text, flags=re.M)
    out = {}
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(kvf_\w+)\s*\(([^)]*)\)\s*;", text):
        params = []
        for p in m.group(3).split(","):
            p = " ".join(p.split())
            if p not in ("void", ""):
                params.append(re.sub(r"\b\w+$", "", p).strip().replace(" *", "*").replace("const ", ""))
        out[m.group(2)] = (" ".join(m.group(1).split()), params)
    return out


_SCALARS = {
    "kvf_status": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
}


def _expected(ctype):
    if ctype in _SCALARS:
        return _SCALARS[ctype]
    if ctype == "char*":
        return ctypes.c_char_p
    if ctype == "struct kvf_engine*":
        return ctypes.c_void_p
    if ctype in _topology_ffi.STRUCT_POINTERS:
        return _topology_ffi.STRUCT_POINTERS[ctype]
    if ctype.endswith("*") and ctype[:-1] in _SCALARS:
        return ctypes.POINTER(_SCALARS[ctype[:-1]])
    raise AssertionError(f"unknown C type {ctype!r}")


@pytest.fixture(scope="module")
def header():
    if not HEADER.is_file():
        pytest.skip("include/kvferry.h is not in this tree")
    return HEADER.read_text()


def test_signatures_match_the_header(header):
    decls = _declarations(header)
    ours = {n for n in decls if n.startswith(("kvf_topology_", "kvf_layout_", "kvf_plan_")) or n.endswith("_blocks")}
    assert ours == set(_topology_ffi.SIGNATURES), "declare every topology function in _topology_ffi.SIGNATURES"
    for name, (restype, argtypes) in _topology_ffi.SIGNATURES.items():
        ret, params = decls[name]
        assert restype is (None if ret == "void" else _expected(ret)), name
        assert [_expected(p) for p in params] == list(argtypes), name


def test_fast_prototypes_match_the_header(header):
    # plan_blocks and pull_ranks call the library through prototypes of
    # their own, with pointers (and sizes) as plain addresses: same arity,
    # a pointer wherever C has one, same widths elsewhere.
    topology.pull_ranks("r", 8, 4, 4)
    topology.plan_blocks(one_cache(4, 0, 64), one_cache(4, 64 * 4, 64), [1], [2])
    decls = _declarations(header)
    for fn, name in [(topology._PLAN, "kvf_plan_blocks_call"), (topology._PULL, "kvf_topology_pull_ranks")]:
        ret, params = decls[name]
        assert ret == "kvf_status" and fn.restype is ctypes.c_int32, name
        assert len(fn.argtypes) == len(params), name
        for c, py in zip(params, fn.argtypes):
            if c.endswith("*"):
                assert py in (ctypes.c_void_p, ctypes.c_char_p), (name, c, py)
            else:
                assert ctypes.sizeof(py) == ctypes.sizeof(_expected(c)), (name, c, py)


def test_structs_and_constants_match_the_header(header):
    defines = dict(re.findall(r"#define (KVF_\w+) (\S+)", header))
    for name in [n for n in dir(_topology_ffi) if n.startswith("KVF_")]:
        assert int(defines[name]) == getattr(_topology_ffi, name), name
    for struct, cls in [
        ("kvf_pd_shape", _topology_ffi.PdShape),
        ("kvf_cache_layout", _topology_ffi.CacheLayout),
        ("kvf_plan_options", _topology_ffi.PlanOptions),
        ("kvf_plan_call", _topology_ffi.PlanCall),
    ]:
        body = re.search(r"typedef struct %s \{(.*?)\}" % struct, header, re.S).group(1)
        fields = re.findall(r"^\s*(?:const )?([\w ]+?) (\**)(\w+);", re.sub(r"//[^\n]*", "", body), re.M)
        assert [(n, _expected(t + p)) for t, p, n in fields] == cls._fields_, struct


# ---- COMPAT.md section 2 ------------------------------------------------------------------


def flat(layout):
    """A layout's caches, layer by layer, as compat_plan takes them."""
    return [c for layer in layout.caches for c in layer]


def one_cache(num_blocks, base, block_len, stride=None):
    return topology.Layout([[(base, block_len, stride or block_len)]], num_blocks)


def ops(plan):
    return list(zip(*(list(a) for a in plan)))


def test_plan_examples():
    # local [2,3,4], remote [7,8,9], 1024-byte dense blocks, n = 1: one op.
    local, remote = one_cache(16, 0x1000, 1024), one_cache(16, 0x3000, 1024)
    assert ops(topology.plan_blocks(local, remote, [2, 3, 4], [7, 8, 9])) == [(0x1000 + 2048, 0x3000 + 7168, 3072)]
    # Local stride 2048, remote stride 4096: three 1024-byte ops.
    local, remote = one_cache(16, 0x1000, 1024, 2048), one_cache(16, 0x3000, 1024, 4096)
    assert ops(topology.plan_blocks(local, remote, [2, 3, 4], [7, 8, 9])) == [
        (0x1000 + i * 2048, 0x3000 + j * 4096, 1024) for i, j in [(2, 7), (3, 8), (4, 9)]
    ]
    # Runs: remote [1,2,3,5,6], local [10,11,12,14,15] -> [1,2,3], [5,6].
    local, remote = one_cache(16, 0, 256), one_cache(16, 0x10000, 256)
    assert ops(topology.plan_blocks(local, remote, [10, 11, 12, 14, 15], [1, 2, 3, 5, 6])) == [
        (10 * 256, 0x10000 + 256, 768),
        (14 * 256, 0x10000 + 5 * 256, 512),
    ]
    # n = 2, second slice, every block its own op; and the push direction.
    local, remote = one_cache(8, 0x100000, 1024), one_cache(8, 0x200000, 512)
    assert ops(topology.plan_blocks(local, remote, [4, 5], [0, 1], pulls=2, offset_index=1)) == [
        (0x100000 + 4 * 1024 + 512, 0x200000, 512),
        (0x100000 + 5 * 1024 + 512, 0x200000 + 512, 512),
    ]
    assert ops(topology.plan_blocks(remote, local, [0], [4], pulls=2, offset_index=1, split="remote")) == [
        (0x200000, 0x100000 + 4 * 1024 + 512, 512)
    ]
    # Prefix hits.
    local, remote = one_cache(8, 0, 64), one_cache(8, 0x1000, 64)
    hit = topology.plan_blocks(local, remote, [6, 7], [0, 1, 2, 3], computed_tokens=32, tokens_per_block=16)
    assert ops(hit) == [(6 * 64, 0x1000 + 2 * 64, 128)]
    assert ops(topology.plan_blocks(local, remote, [6, 7], [0, 1, 2, 3], trim_remote_head=True)) == ops(hit)
    # Nothing to plan.
    assert ops(topology.plan_blocks(local, remote, [], [])) == []


def random_case(rng):
    """Two layouts and a request, valid by construction, as the property
    tests of the crate build them."""
    pulls = rng.choice([1, 1, 2, 4])
    split = rng.choice(["local", "local", "remote"])
    layers, caches = rng.randint(1, 4), rng.randint(1, 2)
    nl, nr = rng.randint(1, 40), rng.randint(1, 40)
    next_base = [0x100000]

    def cache(block_len, scale, blocks):
        stride = block_len + rng.choice([0, 0, 0, 8, block_len])
        base = next_base[0]
        next_base[0] += stride * scale * blocks + rng.randint(0, 4096)
        return (base, block_len, stride, scale)

    local, remote = [], []
    for _ in range(layers):
        lc, rc = [], []
        for _ in range(caches):
            ib, scale = 16 * rng.randint(1, 4), rng.randint(1, 3)
            llen, rlen = (ib * pulls, ib) if split == "local" else (ib, ib * pulls)
            lc.append(cache(llen, scale, nl))
            rc.append(cache(rlen, scale, nr))
        local.append(lc)
        remote.append(rc)

    def ids(count, blocks):
        if rng.random() < 0.3:
            return rng.sample(range(blocks), count)
        # Long +1 runs with a few gaps: a window with some ids dropped.
        extra = rng.randint(0, min(3, blocks - count))
        start = rng.randint(0, blocks - count - extra)
        window = list(range(start, start + count + extra))
        for _ in range(extra):
            window.pop(rng.randrange(len(window)))
        return window

    count = rng.randint(0, min(nl, nr))
    local_ids = ids(count, nl)
    skip = rng.randint(0, nr - count)
    remote_ids = ids(count + skip, nr)
    prefix = rng.choice([{}, {"trim_remote_head": True}, {"computed_tokens": skip * 16, "tokens_per_block": 16}])
    if not prefix:
        remote_ids = remote_ids[skip:]
    kwargs = dict(pulls=pulls, offset_index=rng.randrange(pulls), split=split, **prefix)
    return (local, nl), (remote, nr), local_ids, remote_ids, kwargs


def test_plans_match_the_transcription_for_random_layouts():
    rng = random.Random(20240605)
    nonempty = 0
    for _ in range(400):
        (lc, nl), (rc, nr), local_ids, remote_ids, kwargs = random_case(rng)
        local, remote = topology.Layout(lc, nl), topology.Layout(rc, nr)
        got = [list(a) for a in topology.plan_blocks(local, remote, local_ids, remote_ids, **kwargs)]
        want = compat_plan.plan(flat(local), flat(remote), local_ids, remote_ids, **kwargs)
        assert got == [list(w) for w in want], (lc, rc, local_ids, remote_ids, kwargs)
        nonempty += bool(local_ids)
        # Every op stays inside its cache's region on both sides.
        regions_l, regions_r = local.regions(), remote.regions()
        for la, ra, n in zip(*got):
            assert any(a <= la and la + n <= a + m for a, m in regions_l)
            assert any(a <= ra and ra + n <= a + m for a, m in regions_r)
    assert nonempty > 300


def test_plans_larger_than_the_first_guess():
    # 61 layers x 2 caches x 80 blocks, n = 2: 9760 ops, more than the
    # per-thread scratch arrays hold, so the library sizes the result.
    def caches(base, n):
        return [[(base + (2 * layer + c) * n * 80, n) for c in range(2)] for layer in range(61)]

    local, remote = topology.Layout(caches(1 << 30, 1024), 80), topology.Layout(caches(1 << 40, 512), 80)
    ids = list(range(80))
    assert 61 * 2 * 80 > topology._SCRATCH_OPS
    got = topology.plan_blocks(local, remote, ids, ids[::-1], pulls=2, offset_index=1)
    want = compat_plan.plan(flat(local), flat(remote), ids, ids[::-1], pulls=2, offset_index=1)
    assert len(got[0]) == 9760 and [list(a) for a in got] == [list(w) for w in want]
    # A small plan after it still comes out of the scratch arrays, right.
    small = topology.plan_blocks(local, remote, [3], [4], pulls=2, offset_index=1)
    want = compat_plan.plan(flat(local), flat(remote), [3], [4], pulls=2, offset_index=1)
    assert len(small[0]) == 122 and [list(a) for a in small] == [list(w) for w in want]


def plan_lists(plan):
    return [list(a) for a in plan]


def test_plan_results_are_the_callers():
    # Every call returns arrays of its own: a later plan (in the per-thread
    # scratch arrays) does not change an earlier result.
    local, remote = one_cache(16, 0x1000, 1024), one_cache(16, 0x3000, 1024)
    first = topology.plan_blocks(local, remote, [2, 3, 4], [7, 8, 9])
    kept = plan_lists(first)
    topology.plan_blocks(local, remote, [5, 9], [1, 3])
    assert plan_lists(first) == kept
    assert all(type(a) is array.array and a.typecode == "Q" for a in first)
    first[0].append(1)  # they are ordinary, growable arrays


def test_plan_id_forms():
    # Lists, ranges (a step-1 range is a span: two integers reach the
    # library), array('Q') and other integer arrays, tuples and iterators
    # all plan alike.
    local, remote = one_cache(64, 0x100000, 256), one_cache(64, 0x200000, 256)
    cases = [
        ([2, 3, 4, 9], [7, 8, 9, 10]),
        ([0, 1, 2], [5, 6, 7]),
        ([10, 12, 14], [1, 2, 3]),
        ([5, 4, 3], [1, 2, 3]),
        ([], []),
        ([63], [0]),
    ]
    forms = [
        list,
        tuple,
        iter,
        lambda ids: array.array("Q", ids),
        lambda ids: array.array("L", ids),
        lambda ids: array.array("q", ids),
        lambda ids: array.array("I", ids),
        as_range,
    ]
    for local_ids, remote_ids in cases:
        want = plan_lists(topology.plan_blocks(local, remote, local_ids, remote_ids))
        for f in forms:
            for g in forms:
                got = topology.plan_blocks(local, remote, f(local_ids), g(remote_ids))
                assert plan_lists(got) == want, (local_ids, remote_ids, f, g)
    # Spans with options: n = 2, a prefix hit skipping part of a remote span.
    half = one_cache(64, 0x300000, 128)
    want = plan_lists(topology.plan_blocks(local, half, [4, 5, 6], [0, 1, 2], pulls=2, offset_index=1))
    got = topology.plan_blocks(local, half, range(4, 7), range(3), pulls=2, offset_index=1)
    assert plan_lists(got) == want
    want = plan_lists(
        topology.plan_blocks(local, remote, [6, 7], [0, 1, 2, 3], computed_tokens=32, tokens_per_block=16)
    )
    got = topology.plan_blocks(local, remote, range(6, 8), range(4), computed_tokens=32, tokens_per_block=16)
    assert plan_lists(got) == want
    got = topology.plan_blocks(local, remote, range(6, 8), range(4), trim_remote_head=True)
    assert plan_lists(got) == want


def as_range(ids):
    """`ids` as a range when they are one (any step), else unchanged."""
    if len(ids) < 2:
        return range(ids[0], ids[0] + 1) if ids else range(0)
    step = ids[1] - ids[0]
    if step and all(b - a == step for a, b in zip(ids, ids[1:])):
        return range(ids[0], ids[-1] + step, step)
    return ids


def test_plan_id_form_refusals():
    # Bad ids in every form: a clear error, nothing planned, and the next
    # call plans normally.
    local, remote = one_cache(16, 0x1000, 1024), one_cache(16, 0x3000, 1024)
    good = plan_lists(topology.plan_blocks(local, remote, [2, 3, 4], [7, 8, 9]))
    value_errors = [
        range(-1, 2),
        range(1, -2, -1),
        range(1 << 64, (1 << 64) + 1),
        range((1 << 64) - 1, (1 << 64) + 1),
        array.array("q", [1, -2]),
        array.array("i", [-1]),
        [1, -1],
        (1 << 64,),
    ]
    for bad in value_errors:
        with pytest.raises(ValueError, match="remote_ids"):
            topology.plan_blocks(local, remote, [1] * len(bad), bad)
    type_errors = [array.array("d", [1.0]), array.array("u", "a"), [1.0], ["1"], b"\x01", "1", 5, None]
    for bad in type_errors:
        with pytest.raises(TypeError, match="local_ids"):
            topology.plan_blocks(local, remote, bad, [1])
    # The library's refusals: ids or spans beyond the layout.
    with pytest.raises(Error, match=re.escape("remote_ids: the span 14 .. 14 + 3 goes beyond the layout's 16 blocks")):
        topology.plan_blocks(local, remote, [1, 2, 3], range(14, 17))
    with pytest.raises(Error, match="local block id 16 at position 1"):
        topology.plan_blocks(local, remote, array.array("Q", [15, 16]), range(2))
    with pytest.raises(Error, match="cannot pair 3 local block ids with 2 remote block ids"):
        topology.plan_blocks(local, remote, range(3), range(2))
    assert plan_lists(topology.plan_blocks(local, remote, [2, 3, 4], [7, 8, 9])) == good


def test_caller_arrays_are_held_during_the_call():
    # The library reads a caller's array('Q') in place, with the GIL
    # released: the call holds a buffer export on it meanwhile, so another
    # thread cannot resize (move) it. The export, seen through the helper
    # every non-list form goes through:
    ids = array.array("Q", [1, 2, 3])
    address, first, count, keep = topology._ids(ids, "local_ids")
    assert (address, first, count) == (ids.buffer_info()[0], 0, 3)
    with pytest.raises(BufferError):
        ids.append(4)
    del keep
    ids.append(4)


def test_plan_numpy_ids():
    np = pytest.importorskip("numpy")
    local, remote = one_cache(64, 0x100000, 256), one_cache(64, 0x200000, 256)
    local_ids, remote_ids = [2, 3, 4, 9, 1], [7, 8, 9, 10, 20]
    want = plan_lists(topology.plan_blocks(local, remote, local_ids, remote_ids))
    wide = np.array([0, 2, 0, 3, 0, 4, 0, 9, 0, 1], dtype=np.uint64)
    forms = [
        np.array(remote_ids, dtype=np.uint64),  # used in place
        np.array(remote_ids, dtype=np.int64),
        np.array(remote_ids, dtype=np.uint32),
        np.array(remote_ids, dtype=">u8"),  # big-endian: converted
    ]
    for f in forms:
        got = topology.plan_blocks(local, remote, np.array(local_ids, dtype=np.uint64), f)
        assert plan_lists(got) == want, f.dtype
    # Read-only arrays are read in place too.
    frozen = np.array(local_ids, dtype=np.uint64)
    frozen.flags.writeable = False
    assert plan_lists(topology.plan_blocks(local, remote, frozen, remote_ids)) == want
    # A strided view is copied, not misread.
    got = topology.plan_blocks(local, remote, wide[1::2], remote_ids)
    assert plan_lists(got) == want
    # Misaligned memory is copied too.
    raw = np.zeros(8 * 5 + 1, dtype=np.uint8)
    odd = raw[1:].view(np.uint64)
    odd[:] = local_ids
    assert plan_lists(topology.plan_blocks(local, remote, odd, remote_ids)) == want
    assert plan_lists(topology.plan_blocks(local, remote, np.array([], dtype=np.uint64), [])) == [[], [], []]
    with pytest.raises(ValueError, match="remote_ids: -1"):
        topology.plan_blocks(local, remote, local_ids, np.array([1, 2, 3, 4, -1]))
    with pytest.raises(TypeError, match="remote_ids: expected integer ids"):
        topology.plan_blocks(local, remote, local_ids, np.array(remote_ids, dtype=np.float64))
    with pytest.raises(TypeError, match="remote_ids: expected integer ids"):
        topology.plan_blocks(local, remote, local_ids, np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="remote_ids: expected a 1-D array"):
        topology.plan_blocks(local, remote, local_ids, np.ones((5, 1), dtype=np.uint64))
    with pytest.raises(Error, match="remote block id 64"):
        topology.plan_blocks(local, remote, local_ids, np.array([1, 2, 3, 4, 64], dtype=np.uint64))


def test_plans_from_many_threads():
    # The scratch arrays are per thread: concurrent plans do not mix.
    import threading

    rng = random.Random(7)
    cases = []
    for _ in range(8):
        (lc, nl), (rc, nr), local_ids, remote_ids, kwargs = random_case(rng)
        local, remote = topology.Layout(lc, nl), topology.Layout(rc, nr)
        want = compat_plan.plan(flat(local), flat(remote), local_ids, remote_ids, **kwargs)
        cases.append((local, remote, local_ids, remote_ids, kwargs, [list(w) for w in want]))
    failures = []

    def run(case):
        local, remote, local_ids, remote_ids, kwargs, want = case
        for _ in range(200):
            got = plan_lists(topology.plan_blocks(local, remote, local_ids, remote_ids, **kwargs))
            if got != want:
                failures.append((local_ids, remote_ids, kwargs))
                return

    threads = [threading.Thread(target=run, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_plan_refusals():
    local, remote, half = one_cache(8, 0, 1024), one_cache(8, 1 << 20, 1024), one_cache(8, 1 << 21, 512)
    cases = [
        (dict(local_ids=[1, 2], remote_ids=[1]), "cannot pair 2 local block ids with 1 remote block ids"),
        (dict(local_ids=[8], remote_ids=[1]), "local block id 8 at position 0 is not below 8 blocks"),
        (dict(local_ids=[1], remote_ids=[1], pulls=2), "remote block_len 1024 must equal 512"),
        (dict(local_ids=[1], remote_ids=[1], pulls=3), "not divisible by 3 pulls"),
        (dict(local_ids=[1], remote_ids=[1], pulls=0), "pulls must be at least 1"),
        (dict(local_ids=[1], remote_ids=[1, 2], computed_tokens=17, tokens_per_block=16), "not a multiple of 16"),
    ]
    for kwargs, message in cases:
        with pytest.raises(Error, match=re.escape(message)) as e:
            topology.plan_blocks(local, remote, **kwargs)
        assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(Error, match="offset index 2 is not below 2 pulls"):
        topology.plan_blocks(local, half, [1], [1], pulls=2, offset_index=2)
    with pytest.raises(ValueError, match="split"):
        topology.plan_blocks(local, remote, [1], [1], split="left")
    with pytest.raises(ValueError, match="exclude each other"):
        topology.plan_blocks(local, remote, [1], [1], computed_tokens=0, tokens_per_block=16, trim_remote_head=True)
    with pytest.raises(ValueError, match="go together"):
        topology.plan_blocks(local, remote, [1], [1], computed_tokens=16)
    with pytest.raises(TypeError, match="local_layout"):
        topology.plan_blocks(object(), remote, [1], [1])
    with pytest.raises(TypeError, match="local_ids"):
        topology.plan_blocks(local, remote, "12", [1])
    with pytest.raises(ValueError, match="remote_ids"):
        topology.plan_blocks(local, remote, [1], [-1])


def test_layouts():
    layout = topology.Layout([[(0x1000, 256), (0x9000, 128, 192)], [(0x20000, 256, 256, 2), (0x30000, 64)]], 10)
    assert (layout.num_layers, layout.caches_per_layer, layout.num_blocks) == (2, 2, 10)
    assert layout.caches[0][1] == (0x9000, 128, 192, 1)
    assert layout.regions() == [(0x1000, 2560), (0x9000, 1920), (0x20000, 5120), (0x30000, 640)]
    assert "2 layers x 2 caches x 10 blocks" in repr(layout)
    # From a connector's flattened base addresses: K and V per layer.
    c = topology.Layout.from_connector([0x1000, 0x2000, 0x3000, 0x4000], [128], 4)
    assert c.caches == (((0x1000, 128, 128, 1), (0x2000, 128, 128, 1)), ((0x3000, 128, 128, 1), (0x4000, 128, 128, 1)))
    mla = topology.Layout.from_connector([0x1000, 0x2000], [512, 64], 4)
    assert mla.caches == (((0x1000, 512, 512, 1), (0x2000, 64, 64, 1)),)
    with pytest.raises(ValueError, match="whole layers"):
        topology.Layout.from_connector([0x1000, 0x2000, 0x3000], [128], 4)
    # Refusals: Python-side shape checks, then the library's own.
    with pytest.raises(ValueError, match="non-empty"):
        topology.Layout([], 4)
    with pytest.raises(ValueError, match="layer 0 has 2"):
        topology.Layout([[(0, 1), (8, 1)], [(16, 1)]], 4)
    with pytest.raises(TypeError, match="base, block_len"):
        topology.Layout([[(0,)]], 4)
    with pytest.raises(Error, match="stride 512 is below block_len 1024"):
        topology.Layout([[(0, 1024, 512)]], 4)
    with pytest.raises(Error, match="block_len is 0"):
        topology.Layout([[(0, 0)]], 4)
    with pytest.raises(Error, match="overflows 64 bits"):
        topology.Layout([[((1 << 64) - 100, 1024)]], 4)
    # Closing is idempotent; a closed layout is refused.
    with topology.Layout([[(0, 64)]], 4) as closed:
        pass
    closed.close()
    with pytest.raises(Error, match="closed"):
        topology.plan_blocks(closed, layout, [0], [0])


# ---- transfer_blocks between two engines ---------------------------------------------------

LAYERS, CACHES, BLOCKS, SLICE = 3, 2, 16, 256


@pytest.fixture(scope="module")
def pair():
    """A decode and a prefill engine, each with one 1 MiB registered buffer."""
    decode, prefill = make_engine(), make_engine()
    dbuf, pbuf = ctypes.create_string_buffer(1 << 20), ctypes.create_string_buffer(1 << 20)
    decode.register(ctypes.addressof(dbuf), len(dbuf))
    prefill.register(ctypes.addressof(pbuf), len(pbuf))
    yield decode, prefill, dbuf, pbuf
    decode.close()
    prefill.close()


def layout_in(buf, block_len, pad):
    """LAYERS x CACHES caches of BLOCKS blocks inside `buf`; odd caches padded."""
    base = ctypes.addressof(buf)
    caches = [
        [
            (base + (layer * CACHES + c) * 0x10000 + 96, block_len, block_len + (pad if c % 2 else 0))
            for c in range(CACHES)
        ]
        for layer in range(LAYERS)
    ]
    return topology.Layout(caches, BLOCKS)


def apply_plan(dst, dst_base, src, src_base, plan):
    """The bytes `plan` moves from `src` into a copy of `dst`, by hand."""
    out = bytearray(dst.raw)
    src_bytes = src.raw
    for d, s, n in zip(*plan):
        out[d - dst_base : d - dst_base + n] = src_bytes[s - src_base : s - src_base + n]
    return bytes(out)


def fill(buf, seed):
    n = len(buf)
    ctypes.memmove(buf, random.Random(seed).getrandbits(8 * n).to_bytes(n, "little"), n)


def test_transfer_blocks_pull_and_push(pair):
    decode, prefill, dbuf, pbuf = pair
    dl = layout_in(dbuf, 2 * SLICE, 64)  # a decode block holds two prefill slices
    pl = layout_in(pbuf, SLICE, 0)
    d_ids, p_ids = [3, 4, 5, 9, 10], [0, 1, 2, 7, 15]
    d_base, p_base = ctypes.addressof(dbuf), ctypes.addressof(pbuf)

    # Pull: decode reads its second head slice (n = 2, o = 1).
    fill(dbuf, 1)
    fill(pbuf, 2)
    plan = compat_plan.plan(flat(dl), flat(pl), d_ids, p_ids, pulls=2, offset_index=1)
    want = apply_plan(dbuf, d_base, pbuf, p_base, plan)
    assert topology.transfer_blocks(decode, prefill.name, dl, pl, d_ids, p_ids, pulls=2, offset_index=1) is None
    assert dbuf.raw == want

    # Push, asynchronously: prefill writes into the first half of the decode blocks.
    fill(dbuf, 3)
    plan = compat_plan.plan(flat(pl), flat(dl), p_ids, d_ids, pulls=2, offset_index=0, split="remote")
    want = apply_plan(dbuf, d_base, pbuf, p_base, [plan[1], plan[0], plan[2]])
    batch_id = topology.transfer_blocks(
        prefill, decode.name, pl, dl, p_ids, d_ids, opcode=topology.WRITE, pulls=2, wait=False
    )
    assert batch_id
    batch = prefill.batch(batch_id)
    batch.wait()
    batch.free()
    assert dbuf.raw == want

    # n = 1 with a prefix hit, over a layout of prefill-sized blocks.
    d1 = layout_in(dbuf, SLICE, 32)
    fill(dbuf, 4)
    plan = compat_plan.plan(flat(d1), flat(pl), [6, 7, 8], [0, 1, 2, 3, 4], computed_tokens=256, tokens_per_block=128)
    want = apply_plan(dbuf, d_base, pbuf, p_base, plan)
    topology.transfer_blocks(
        decode, prefill.name, d1, pl, [6, 7, 8], [0, 1, 2, 3, 4], computed_tokens=256, tokens_per_block=128
    )
    assert dbuf.raw == want

    # The same with ids as a range and an array('Q') (plan_blocks' forms).
    fill(dbuf, 5)
    want = apply_plan(dbuf, d_base, pbuf, p_base, plan)
    topology.transfer_blocks(
        decode,
        prefill.name,
        d1,
        pl,
        range(6, 9),
        array.array("Q", [0, 1, 2, 3, 4]),
        computed_tokens=256,
        tokens_per_block=128,
    )
    assert dbuf.raw == want

    # Nothing to move: fine synchronously, no batch asynchronously.
    topology.transfer_blocks(decode, prefill.name, d1, pl, [], [])
    with pytest.raises(Error, match="no blocks to transfer"):
        topology.transfer_blocks(decode, prefill.name, d1, pl, [], [], wait=False)

    # Refusals move nothing.
    before_d, before_p = dbuf.raw, pbuf.raw
    with pytest.raises(Error, match="remote block id 16 at position 4") as e:
        topology.transfer_blocks(decode, prefill.name, dl, pl, d_ids, [0, 1, 2, 7, 16], pulls=2)
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(Error, match="block_len 256 must equal 512"):
        topology.transfer_blocks(decode, prefill.name, dl, pl, d_ids, p_ids)
    stray = ctypes.create_string_buffer(LAYERS * CACHES * 0x10000)
    with pytest.raises(Error) as e:
        topology.transfer_blocks(decode, prefill.name, layout_in(stray, 2 * SLICE, 64), pl, d_ids, p_ids, pulls=2)
    assert e.value.status == Status.LOCAL_OUT_OF_RANGE
    with pytest.raises(Error) as e:
        topology.transfer_blocks(decode, "127.0.0.1:1", d1, pl, d_ids, p_ids)
    assert e.value.status == Status.PEER_UNREACHABLE
    with pytest.raises(ValueError, match="opcode"):
        topology.transfer_blocks(decode, prefill.name, d1, pl, d_ids, p_ids, opcode=2)
    with pytest.raises(TypeError, match="session"):
        topology.transfer_blocks(decode, None, d1, pl, d_ids, p_ids)
    with pytest.raises(TypeError, match="engine"):
        topology.transfer_blocks(object(), prefill.name, d1, pl, d_ids, p_ids)
    assert dbuf.raw == before_d and pbuf.raw == before_p


def test_transfer_blocks_through_the_mooncake_engine(pair):
    _, prefill, dbuf, pbuf = pair
    te = kvferry.TransferEngine()
    with pytest.raises(Error, match="not initialized"):
        topology.transfer_blocks(te, prefill.name, None, None, [], [])
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    try:
        buf = ctypes.create_string_buffer(1 << 20)
        assert te.register_memory(ctypes.addressof(buf), len(buf)) == 0
        local, remote = layout_in(buf, SLICE, 0), layout_in(pbuf, SLICE, 0)
        pairs = list(zip(flat(local), flat(remote)))
        ids = list(range(BLOCKS))

        def moved():
            return all(
                ctypes.string_at(lb, n * BLOCKS) == ctypes.string_at(rb, n * BLOCKS)
                for (lb, n, _, _), (rb, *_) in pairs
            )

        fill(pbuf, 7)
        topology.transfer_blocks(te, prefill.name, local, remote, ids, ids)
        assert moved()
        # The methods the engines delegate with, once they have them.
        if hasattr(te, "transfer_blocks"):
            fill(pbuf, 8)
            assert te.transfer_blocks(prefill.name, local, remote, ids, ids) == 0
            assert moved()
            assert te.transfer_blocks(prefill.name, local, remote, ids, [BLOCKS] * BLOCKS) == -1
            assert "remote block id 16" in kvferry.last_error()
            fill(pbuf, 9)
            batch = te.transfer_blocks_async(prefill.name, local, remote, ids, ids)
            assert batch
            status = 0
            while status == 0:
                status = te.transfer_check_status(batch)
            assert status == 1 and moved()
            assert te.transfer_blocks_async(prefill.name, local, remote, [], []) == 0
        engine = te.get_engine()
        if hasattr(engine, "transfer_blocks"):
            fill(pbuf, 10)
            engine.transfer_blocks(prefill.name, local, remote, ids, ids)
            assert moved()
            fill(pbuf, 11)
            with engine.submit_blocks(prefill.name, local, remote, ids, ids):
                pass
            assert moved()
    finally:
        te.close()
