#!/usr/bin/env python3
"""The Python side of benches/topology.rs: the pure-Python loop the
connectors run today against kvferry's Python API, on the same scenarios.

- plan: 61 layers x 2 caches, 256 and 2048 blocks per request, ids
  contiguous, fragmented (runs of 8) or split (n = 2: every block its own
  op). The loop is python/tests/compat_plan.py (COMPAT.md section 2 in the
  connectors' shape); the API call is `kvferry.topology.plan_blocks`, the
  whole call (ids in, three address arrays out), with the ids as the
  connectors hold them (`api`: Python lists) and as a connector could
  keep them at no conversion cost: `array('Q')` (`api_array`), `range`
  objects where the ids are one (`api_range`: contiguous and split), numpy
  uint64 arrays when numpy is installed (`api_numpy`). `convert` is the
  time of the two `array('Q', list)` conversions alone: the least any call
  taking lists can cost, so `loop / convert` bounds the list ratio.
- pull: the decode rank lists of one request: the rules in Python with
  CPython's `random` and `hashlib` (the crate's oracle, the connectors'
  code path) against `kvferry.topology.pull_ranks`.

Prints one JSON document: per scenario the op count and seconds per call
of each side (the `api*` entries are null when libkvferry.so cannot be loaded: set
KVFERRY_LIBRARY, or `cargo build --release -p kvferry-capi`). Standalone:
`python3 benches/topology_python.py` prints a table instead.
"""

from __future__ import annotations

import array
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python" / "tests"))

import compat_plan  # noqa: E402

LAYERS, CACHES = 61, 2
SLICE = 16384  # bytes of one prefill rank's share of a block, per cache
BASE = 0x7F3A_0000_0000  # where real KV caches live
REQUEST = "cmpl-8f1d6a2c-4b7e-4f0a-9c3e-2d5b7a9e1c44-0"
PULL_SHAPES = [(8, 4, 4, "gqa", 1), (16, 2, 16, "gqa", 1), (8, 4, 1, "mla", 1), (32, 8, 8, "gqa", 2)]


def scenario(blocks: int, kind: str):
    """(local caches, remote caches, num_blocks, local ids, remote ids, pulls):
    the same numbers benches/topology.rs builds."""
    pulls = 2 if kind == "split" else 1
    if kind == "fragmented":
        local_ids = [i + i // 8 for i in range(blocks)]  # a hole after every 8 blocks
    else:
        local_ids = list(range(blocks))
    remote_ids = list(range(blocks))
    num_blocks = blocks + blocks // 8 + 1
    local, remote = [], []
    for c in range(LAYERS * CACHES):
        llen, rlen = SLICE * pulls, SLICE
        local.append((BASE + c * llen * num_blocks, llen, llen, 1))
        remote.append((BASE + (1 << 40) + c * rlen * num_blocks, rlen, rlen, 1))
    return local, remote, num_blocks, local_ids, remote_ids, pulls


def seconds_per_call(*fns, budget: float = 0.6, rounds: int = 7) -> list[float]:
    """Seconds per call of each of `fns`: the median over `rounds` of the
    mean time of a batch of calls, the functions taking turns in every
    round, so that load from other processes weighs on all of them alike."""
    counts = []
    for fn in fns:
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        counts.append(max(1, int(budget / len(fns) / rounds / once)))
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, n, out in zip(fns, counts, samples):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - start) / n)
    return [statistics.median(s) for s in samples]


def load_api():
    """kvferry.topology (the installed package, or python/ with
    KVFERRY_LIBRARY set), or None with the reason."""
    try:
        from kvferry import topology

        topology.pulls_per_rank(1, 1, 1)
        return topology, None
    except Exception as e:  # noqa: BLE001 - report, do not fail the bench
        return None, f"{type(e).__name__}: {e}"


def convert_both(local_ids, remote_ids):
    """What any call taking the ids as lists does first."""
    return array.array("Q", local_ids), array.array("Q", remote_ids)


def load_rules():
    spec = importlib.util.spec_from_file_location(
        "rules", REPO / "crates" / "kvferry-topology" / "tests" / "oracle" / "rules.py"
    )
    rules = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rules)
    return rules


def main() -> None:
    topology, why = load_api()
    rules = load_rules()
    out = {"python": sys.version.split()[0], "api_error": why, "plan": {}, "pull": {}}
    try:
        import numpy
    except ImportError:
        numpy = None
    for blocks in (256, 2048):
        for kind in ("contiguous", "fragmented", "split"):
            local, remote, num_blocks, lids, rids, pulls = scenario(blocks, kind)
            name = f"{LAYERS}x{CACHES}x{blocks}/{kind}"
            ref = compat_plan.plan(local, remote, lids, rids, pulls=pulls)
            row = {"ops": len(ref[0]), "loop": None, "api": None}
            loop = functools.partial(compat_plan.plan, local, remote, lids, rids, pulls=pulls)
            convert = functools.partial(convert_both, lids, rids)
            if topology is None:
                row["loop"], row["convert"] = seconds_per_call(loop, convert)
                out["plan"][name] = row
                continue
            ll = topology.Layout([local[i : i + CACHES] for i in range(0, len(local), CACHES)], num_blocks)
            rl = topology.Layout([remote[i : i + CACHES] for i in range(0, len(remote), CACHES)], num_blocks)
            forms = {"api": (lids, rids), "api_array": (array.array("Q", lids), array.array("Q", rids))}
            if lids == list(range(blocks)):
                forms["api_range"] = (range(blocks), range(blocks))
            if numpy is not None:
                forms["api_numpy"] = (numpy.array(lids, dtype=numpy.uint64), numpy.array(rids, dtype=numpy.uint64))
            calls = {}
            for key, (li, ri) in forms.items():
                got = topology.plan_blocks(ll, rl, li, ri, pulls=pulls)
                assert [list(a) for a in got] == [list(a) for a in ref], f"{name} {key}: the API and the loop disagree"
                calls[key] = functools.partial(topology.plan_blocks, ll, rl, li, ri, pulls=pulls)
            times = seconds_per_call(loop, convert, *calls.values())
            row["loop"], row["convert"] = times[:2]
            row.update(zip(calls, times[2:]))
            out["plan"][name] = row
    for p, d, h, kind, s in PULL_SHAPES:
        name = f"P{p}-D{d}-H{h}-{kind}-S{s}"
        ref = rules.pull_lists(p, d, h, kind, s, REQUEST)
        row = {"loop": None, "api": None}
        loop = functools.partial(rules.pull_lists, p, d, h, kind, s, REQUEST)
        if topology is None:
            (row["loop"],) = seconds_per_call(loop, budget=0.3)
        else:
            assert topology.pull_ranks(REQUEST, p, d, h, kind, s) == ref, name
            api = functools.partial(topology.pull_ranks, REQUEST, p, d, h, kind, s)
            row["loop"], row["api"] = seconds_per_call(loop, api, budget=0.3)
        out["pull"][name] = row
    if "--json" in sys.argv:
        json.dump(out, sys.stdout)
        return
    if why:
        print(f"kvferry.topology not loaded ({why}): loop times only")
    for name, row in out["plan"].items():
        loop = row["loop"]
        cells = [f"plan  {name:26} loop {loop * 1e6:9.1f} us"]
        for key, label in (("api", "list"), ("api_array", "array"), ("api_range", "range"), ("api_numpy", "numpy")):
            t = row.get(key)
            cells.append(f"{label} {t * 1e6:7.1f} us {loop / t:5.1f}x" if t else f"{label} {'-':>18}")
        cells.append(f"lists->arrays {row['convert'] * 1e6:5.1f} us (<= {loop / row['convert']:.0f}x)")
        print(" | ".join(cells))
    for name, row in out["pull"].items():
        api = row["api"]
        ratio = f"{row['loop'] / api:5.1f}x" if api else "    -"
        api_us = f"{api * 1e6:7.1f}" if api else "      -"
        print(f"pull  {name:26} loop {row['loop'] * 1e6:9.1f} us | api {api_us} us {ratio}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
