#!/usr/bin/env python3
"""Runs every benchmark of kvferry on this machine and writes docs/benchmarks.md.

Started by scripts/bench (which builds the tools and prepares the virtual
environment); see that script for the command line. Phases:

1. physical limits: tools/memcpy_limit.c, tools/cma_limit.c (at the grid's
   block and batch sizes), iperf3 on loopback (one stream, -l 1M; and two);
2. `kvferry bench` over local, cma and tcp, over the grid;
3. te_pingpong.py with Mooncake's engine (tcp) and, when the kvferry Python
   package imports, with kvferry's, plus the same workload through the CLI;
4. the page: tables with ratios, a plot, and a discussion of every cell below
   0.9 of its limit or below Mooncake (tools/bench/discussion.md).

Raw results go to target/bench/results.json; `--report-only` renders the
page again from them.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "target", "bench")
KVFERRY = os.path.join(ROOT, "target", "release", "kvferry")
TE_PINGPONG = os.path.join(ROOT, "tools", "te_pingpong.py")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
PLOT = os.path.join(ROOT, "docs", "benchmarks.png")
DISCUSSION = os.path.join(ROOT, "tools", "bench", "discussion.md")

KIB = 1 << 10
MIB = 1 << 20
BLOCKS = [16 * KIB, 128 * KIB, 1 * MIB, 4 * MIB]
BATCHES = [8, 32, 128]
THREADS = [1, 2]
TRANSPORTS = ["local", "cma", "tcp"]
OPS = ["read", "write"]
# A cell moves threads x batch x block bytes per round; larger is skipped.
MAX_ROUND = 256 * MIB
# Cells shaped like iperf3 (1 MiB buffers, small footprint), to tell the
# engine's cost from the cache's: (transport, block, batch), 1 thread.
EXTRA = [(t, MIB, n) for t in ["cma", "tcp"] for n in [1, 4]]
HEADLINE_BATCH = 32
# te_pingpong table cells are the median of this many runs (not in --quick).
PINGPONG_REPEATS = 3


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_size(n):
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n // KIB} KiB"


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_quiet(limit, max_wait):
    """Waits until the 1-minute load average is below `limit` (at most
    `max_wait` seconds); returns the load measured at the end."""
    start = time.time()
    load = loadavg()
    warned = False
    while load > limit and time.time() - start < max_wait:
        if not warned:
            log(f"load average {load:.2f} > {limit}: waiting up to {max_wait:.0f} s for a quiet machine")
            warned = True
        time.sleep(5)
        load = loadavg()
    return load


def busy_seconds():
    """CPU seconds all processes of the machine have been busy (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(fn, retries=2, max_others=0.25):
    """Runs `fn` and returns its result with `others_cpu`: the cores that
    processes other than the benchmark's kept busy meanwhile (machine-wide
    busy time less the benchmark processes' own CPU time). A run where
    others used more than `max_others` of a core is measured again after
    waiting for a quieter moment; the quietest attempt is kept."""
    best = None
    for attempt in range(retries + 1):
        b0, c0, t0 = busy_seconds(), children_seconds(), time.time()
        r = fn()
        b1, c1, t1 = busy_seconds(), children_seconds(), time.time()
        others = max(0.0, (b1 - b0) - (c1 - c0)) / max(t1 - t0, 1e-6)
        r["others_cpu"] = round(others, 2)
        r["attempts"] = attempt + 1
        if best is None or others < best["others_cpu"]:
            best = r
        if others <= max_others or "error" in r:
            break
        wait_quiet(0.5, 20)
    return best


def median_of(fn, n):
    """`measured(fn)` `n` times in a row; returns the run with the median
    GB/s (its latencies and others' CPU with it) and every run's GB/s under
    `runs`. One run of a few seconds on this shared machine swings by 10% and
    more; the median of three takes a single outlier out, for every engine
    and reference alike."""
    rs = [measured(fn) for _ in range(n)]
    ok = [r for r in rs if "gbps" in r]
    if len(ok) < len(rs):
        return next(r for r in rs if "gbps" not in r)
    ok.sort(key=lambda r: r["gbps"])
    mid = dict(ok[len(ok) // 2])
    mid["runs"] = [r["gbps"] for r in rs]
    return mid


def run(cmd, timeout=300, env=None, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


# ---- machine ------------------------------------------------------------------

def machine():
    info = {"kernel": platform.release(), "cores": os.cpu_count()}
    try:
        lscpu = run(["lscpu"]).stdout
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
        for key in ["Thread(s) per core", "Core(s) per socket", "Socket(s)", "Hypervisor vendor", "L3 cache"]:
            m = re.search(rf"^{re.escape(key)}:\s*(.+)$", lscpu, re.M)
            if m:
                info[key] = m.group(1).strip()
    except Exception as e:  # noqa: BLE001 - the page says what is unknown
        info["cpu"] = f"unknown ({e})"
    with open("/proc/meminfo") as f:
        kb = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
    info["memory_gib"] = round(kb / (1 << 20), 1)
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            info["ptrace_scope"] = f.read().strip()
    except OSError:
        info["ptrace_scope"] = "n/a"
    return info


# ---- limits -------------------------------------------------------------------

def memcpy_limit(tools, min_s):
    out = run([os.path.join(tools, "memcpy_limit"), str(min_s)]).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"(\S+)\s+(\d)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            rows.append({"size": m.group(1), "threads": int(m.group(2)),
                         "best": float(m.group(3)), "median": float(m.group(4))})
    return {"raw": out, "rows": rows}


def cma_limit(tools, batches, blocks, min_s):
    """cma_limit in `hot` mode (each thread copies the same `batch` blocks
    every call, as kvferry bench's cells and te_pingpong do), one run per
    batch size (iovecs per call)."""
    res = {}
    raw = []
    for batch in batches:
        kib = ",".join(str(b // KIB) for b in blocks)
        out = run([os.path.join(tools, "cma_limit"), str(min(batch, 1024)), str(min_s), "256", "hot", kib],
                  timeout=600).stdout
        raw.append(out)
        for line in out.splitlines():
            m = re.match(r"(read|write)\s+(\d+)(KiB|MiB)\s+(\d)\s+([\d.]+)\s+([\d.]+)\s+(\d+)", line)
            if m:
                block = int(m.group(2)) * (KIB if m.group(3) == "KiB" else MIB)
                key = f"{m.group(1)}/{block}/{batch}/{m.group(4)}"
                calls = float(m.group(7))
                res[key] = {"best": float(m.group(5)), "median": float(m.group(6)),
                            "us_per_call": 1e6 / calls if calls else None}
    return {"raw": "\n".join(raw), "cells": res}


def iperf3(streams, seconds):
    port = "5301"
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = run(["iperf3", "-c", "127.0.0.1", "-p", port, "-l", "1M", "-P", str(streams), "-t", str(seconds), "-J"],
                  timeout=seconds + 30).stdout
        d = json.loads(out)
        return {"gbps": d["end"]["sum_received"]["bits_per_second"] / 8e9, "streams": streams}
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def tcp_limit(tools, footprints, seconds, streams=(1, 2, 4)):
    """tools/tcp_limit.c: loopback TCP streams of 1 MiB sends, whose senders
    and receivers walk through buffers that add up to `footprint` bytes on
    each side, as one batch of that many bytes does (iperf3 reuses one 1 MiB
    buffer, which stays in the caches). 1, 2 and 4 streams (kvferry spreads
    large batches over its lanes); the limit is the best of them."""
    kib = ",".join(str(f // KIB) for f in footprints)
    out = run([os.path.join(tools, "tcp_limit"), str(seconds), kib, ",".join(map(str, streams))], timeout=900).stdout
    best, by_streams = {}, {}
    for line in out.splitlines():
        m = re.match(r"tcp_limit footprint_KiB=(\d+) streams=(\d+) GB/s=([\d.]+)", line)
        if m:
            f, n, v = str(int(m.group(1)) * KIB), int(m.group(2)), float(m.group(3))
            by_streams.setdefault(f, {})[str(n)] = v
            best[f] = max(best.get(f, 0.0), v)
    return {"raw": out, "gbps": best, "by_streams": by_streams}


def tcp_footprint_limit(results, block):
    """tcp_limit at the footprint of one headline batch of `block`-sized ops."""
    return results["limits"].get("tcp_footprint", {}).get("gbps", {}).get(str(block * HEADLINE_BATCH))


# ---- kvferry bench --------------------------------------------------------------

def kvferry_cell(transport, op, block, batch, threads, duration, layout="scattered"):
    cmd = [KVFERRY, "bench", "--json", "--transport", transport, "--operation", op,
           "--block-size", str(block), "--batch-size", str(batch), "--threads", str(threads),
           "--duration", str(duration), "--layout", layout,
           # Every batch moves the same remote blocks (like te_pingpong and
           # cma_limit's hot mode): the buffer holds exactly one batch per thread.
           "--buffer-size", str(block * batch * threads)]
    if transport == "local":
        cmd.append("--reference")
    p = run(cmd, timeout=duration * 4 + 60, check=False)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[-400:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def grid(duration, quick):
    blocks = BLOCKS if not quick else [16 * KIB, 1 * MIB]
    batches = BATCHES if not quick else [HEADLINE_BATCH]
    threads = THREADS if not quick else [1]
    cells = {}
    todo = [(t, op, b, n, th) for t in TRANSPORTS for op in OPS for b in blocks for n in batches for th in threads
            if b * n * th <= MAX_ROUND]
    if not quick:
        todo += [(t, op, b, n, 1) for t, b, n in EXTRA for op in OPS]
    for i, (t, op, b, n, th) in enumerate(todo):
        key = f"{t}/{op}/{b}/{n}/{th}"
        r = measured(lambda: kvferry_cell(t, op, b, n, th, duration))
        r["load"] = loadavg()
        cells[key] = r
        if "error" in r:
            log(f"[{i + 1}/{len(todo)}] {key}: ERROR {r['error']}")
        else:
            ref = f" (memcpy {r['reference']['gbps']:.2f})" if "reference" in r else ""
            log(f"[{i + 1}/{len(todo)}] {key}: {r['gbps']:.2f} GB/s{ref} p50 {r['lat_p50_us']:.0f} us "
                f"(others {r['others_cpu']:.2f} cores, {r['attempts']} attempt(s))")
    return cells


# ---- te_pingpong ----------------------------------------------------------------

PP_RE = re.compile(r"([\d.]+)GB/s\s+(\d+)batches/s\s+p50=(\d+)us\s+p99=(\d+)us")


def pingpong(python, module, protocol, op, block, seconds, env=None):
    cmd = [python, TE_PINGPONG, module, protocol, "--block", str(block), "--batch", str(HEADLINE_BATCH),
           "--seconds", str(seconds), "--op", op]
    try:
        p = run(cmd, timeout=seconds + 120, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    m = PP_RE.search(p.stdout)
    if not m:
        return {"error": (p.stderr or p.stdout).strip()[-400:]}
    return {"gbps": float(m.group(1)), "batches_per_s": float(m.group(2)),
            "lat_p50_us": float(m.group(3)), "lat_p99_us": float(m.group(4))}


def importable(python, module):
    return run([python, "-c", f"import {module}"], check=False, timeout=60).returncode == 0


def pingpongs(python, seconds, quick):
    blocks = BLOCKS if not quick else [16 * KIB, 1 * MIB]
    repeats = 1 if quick else PINGPONG_REPEATS
    res = {"mooncake": {}, "kvferry_py": {}, "kvferry_cli": {}, "skipped": {}, "iperf3": []}

    def reference():
        # iperf3 (one stream, -l 1M) taken before, between and after the
        # engines' cells: loopback speed drifts over the minutes a run takes,
        # and the table's ratios should compare figures of the same minutes.
        r = measured(lambda: iperf3(1, 2 if quick else 3))
        res["iperf3"].append(r)
        log(f"iperf3 (te_pingpong phase): {r.get('gbps')}")

    reference()
    if importable(python, "mooncake.engine"):
        for op in OPS:
            for b in blocks:
                r = median_of(lambda: pingpong(python, "mooncake.engine:TransferEngine", "tcp", op, b, seconds), repeats)
                res["mooncake"][f"tcp/{op}/{b}"] = r
                log(f"mooncake tcp {op} {fmt_size(b)}: {r.get('gbps', r.get('error'))}")
    else:
        res["skipped"]["mooncake"] = ("`pip install mooncake-transfer-engine-non-cuda` did not give an importable "
                                      "`mooncake.engine` on this machine")
        log("Mooncake skipped: " + res["skipped"]["mooncake"])
    if importable(python, "kvferry"):
        # "tcp" forces tcp; "ascend" (what vllm-ascend passes) lets kvferry
        # pick its default same-host path (cma for host memory).
        for proto in ["tcp", "ascend"]:
            for op in OPS:
                for b in blocks:
                    r = median_of(lambda: pingpong(python, "kvferry:TransferEngine", proto, op, b, seconds), repeats)
                    res["kvferry_py"][f"{proto}/{op}/{b}"] = r
                    log(f"kvferry (python) {proto} {op} {fmt_size(b)}: {r.get('gbps', r.get('error'))}")
    else:
        res["skipped"]["kvferry_py"] = ("the kvferry Python package is not importable (`pip install ./python` "
                                        "found no ./python, or it failed): te_pingpong with kvferry:TransferEngine "
                                        "was skipped")
        log("kvferry te_pingpong skipped: " + res["skipped"]["kvferry_py"])
    reference()
    # The same workload through the CLI: contiguous batches of 32 on a
    # buffer of one batch, one thread, as te_pingpong does.
    for t in ["tcp", "cma"]:
        for op in OPS:
            for b in blocks:
                r = median_of(lambda: kvferry_cell(t, op, b, HEADLINE_BATCH, 1, seconds, layout="contiguous"),
                              repeats)
                res["kvferry_cli"][f"{t}/{op}/{b}"] = r
                log(f"kvferry CLI {t} {op} {fmt_size(b)} contiguous: {r.get('gbps', r.get('error'))}")
    reference()
    return res


def pingpong_iperf3_runs(results):
    """The one-stream iperf3 runs taken in the te_pingpong phase, in GB/s."""
    return [r["gbps"] for r in results.get("pingpong", {}).get("iperf3", []) if "gbps" in r]


def pingpong_iperf3(results):
    """The te_pingpong table's iperf3: the median of the runs taken in its
    phase (pages from before those runs: the limits phase's one run)."""
    runs = pingpong_iperf3_runs(results)
    if not runs:
        return results["limits"]["iperf3"].get("1", {}).get("gbps")
    return statistics.median(runs)


# ---- report ----------------------------------------------------------------------

def g(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def limit_for(results, transport, op, block, batch, threads):
    """The reference a kvferry cell is divided by, and its name."""
    cell = results["grid"].get(f"{transport}/{op}/{block}/{batch}/{threads}", {})
    if transport == "local":
        ref = cell.get("reference", {}).get("gbps")
        return ref, "memcpy of the same ops"
    if transport == "cma":
        c = results["limits"]["cma"]["cells"].get(f"{op}/{block}/{batch}/{threads}")
        return (c["median"] if c else None), f"cma_limit ({min(batch, 1024)} iovecs/call, hot)"
    ip = results["limits"]["iperf3"].get(str(threads))
    return (ip["gbps"] if ip else None), f"iperf3 -P {threads} -l 1M"


def mooncake_for(results, op, block):
    r = results.get("pingpong", {}).get("mooncake", {}).get(f"tcp/{op}/{block}", {})
    return r.get("gbps")


def flag(r_limit, r_moon):
    f = []
    if r_limit is not None and r_limit < 0.9:
        f.append("limit")
    if r_moon is not None and r_moon < 1.0:
        f.append("mooncake")
    return f


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = {"local": "tab:green", "cma": "tab:blue", "tcp": "tab:orange"}
    for ax, op in zip(axes, OPS):
        for t in TRANSPORTS:
            xs, ys, ls = [], [], []
            for b in BLOCKS:
                c = results["grid"].get(f"{t}/{op}/{b}/{HEADLINE_BATCH}/1", {})
                lim, _ = limit_for(results, t, op, b, HEADLINE_BATCH, 1)
                if "gbps" in c:
                    xs.append(b // KIB)
                    ys.append(c["gbps"])
                    ls.append(lim)
            if xs:
                ax.plot(xs, ys, "o-", color=colors[t], label=f"kvferry {t}")
            if any(x is not None for x in ls):
                ax.plot([x for x, l in zip(xs, ls) if l], [l for l in ls if l], "--", color=colors[t], alpha=0.6,
                        label={"local": "memcpy (same ops)", "cma": "cma_limit", "tcp": "iperf3 (1 stream)"}[t])
        moon = [(b // KIB, mooncake_for(results, op, b)) for b in BLOCKS]
        moon = [(x, y) for x, y in moon if y is not None]
        if moon:
            ax.plot(*zip(*moon), "s-", color="tab:red", label="Mooncake tcp (te_pingpong)")
        py = results.get("pingpong", {}).get("kvferry_py", {})
        for proto, color in [("tcp", "tab:brown"), ("ascend", "tab:purple")]:
            pts = [(b // KIB, py.get(f"{proto}/{op}/{b}", {}).get("gbps")) for b in BLOCKS]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                label = "kvferry Python tcp (te_pingpong)" if proto == "tcp" else "kvferry Python same-host (te_pingpong)"
                ax.plot(*zip(*pts), "^:", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([b // KIB for b in BLOCKS])
        ax.set_xticklabels([fmt_size(b) for b in BLOCKS])
        ax.set_xlabel("block size (batches of 32, 1 thread)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s (log)")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("kvferry vs its limits and Mooncake, same machine, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def discussion_sections():
    if not os.path.exists(DISCUSSION):
        return {}
    text = open(DISCUSSION).read()
    parts = re.split(r"^<!-- key: (\S+) -->\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def classify(t, op, block, reasons):
    """Which discussion section explains a flagged cell."""
    if "mooncake" in reasons and t == "tcp":
        return "tcp-vs-mooncake"
    if t == "cma":
        return "cma-small" if block <= 128 * KIB else "cma-large"
    if t == "tcp":
        return "tcp-small" if block <= 16 * KIB else "tcp-large"
    return "local"


def report(results, args_line):
    m = results["machine"]
    L = []
    w = L.append
    w("# Benchmarks")
    w("")
    w("Generated by `scripts/bench` from one run on one machine; do not edit by hand "
      "(the discussion comes from `tools/bench/discussion.md`). Every kvferry figure is a ratio "
      "to a reference measured in the same run on the same machine.")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| date | {results['date']} |")
    w(f"| command | `{args_line}` |")
    w(f"| commit | `{results.get('commit', '?')}` |")
    w(f"| CPU | {m.get('cpu')} ({m.get('cores')} cores visible; {m.get('Thread(s) per core', '?')} thread(s) per core"
      f"{'; hypervisor ' + m['Hypervisor vendor'] if 'Hypervisor vendor' in m else ''}) |")
    w(f"| memory | {m.get('memory_gib')} GiB |")
    w(f"| kernel | Linux {m.get('kernel')} (ptrace_scope {m.get('ptrace_scope')}) |")
    loads = results.get("load", {})
    w(f"| load average (1 min) | " + ", ".join(f"{k} {v:.2f}" for k, v in loads.items()) + " |")
    if results.get("quick"):
        w("| mode | **quick** (smoke run: short durations, reduced grid; not for conclusions) |")
    w("")
    w("How to read it: GB/s = 10^9 payload bytes per second. A *cell* is one `kvferry bench` run: "
      "`--threads` threads each submitting synchronous batches of `--batch-size` ops of `--block-size` bytes; "
      "the ops of a batch are not contiguous (remote blocks in reverse order) so the engine moves every "
      "block separately, and every batch moves the same blocks (the target buffer holds one batch per thread, "
      "as in te_pingpong and cma_limit's hot mode). Latency is per batch. References: **local** against memcpy of "
      "the very same ops in the same process and run (`--reference`); **cma** against `tools/cma_limit.c` "
      "with as many iovecs per call as the batch has ops, same block size and threads (the median of its 5 trials, "
      "as kvferry's figure is the mean of its run; the best trial is in the raw results); **tcp** against "
      "`iperf3` on loopback (one stream `-l 1M` for 1 thread, two streams for 2 threads). iperf3 keeps its "
      "data in the CPU caches (one 1 MiB buffer sent over and over); a batch's bytes are as many as the batch. "
      "So tcp cells also show **tcp_limit**: `tools/tcp_limit.c`, loopback streams of 1 MiB sends like "
      "iperf3's, whose senders and receivers walk through buffers that add up to one batch (32 blocks) on each "
      "side; the best of 1, 2 and 4 streams (kvferry spreads batches of 4 MiB and more over its lanes). "
      "With one stream and a 1 MiB footprint it measures what iperf3 does.")
    w("")

    w("One cell by hand: `target/release/kvferry bench --transport cma --operation read --block-size 128K "
      "--batch-size 32 --threads 1 --duration 1.5 --buffer-size 4M` (the buffer holds one batch per thread; "
      "add `--reference` with `--transport local`). The limits: `tools/cma_limit.c 32 0.2 256 hot 16,128,1024,4096`, "
      "`tools/memcpy_limit.c 0.2`, `iperf3 -c 127.0.0.1 -l 1M -P 1`, `tools/tcp_limit.c 1 1024,512,4096,32768,131072 1,2,4`. Criterion benches of the hot paths "
      "(planning, wire encoding, each transport beside memcpy of the same ranges): `cargo bench -p kvferry`.")
    w("")

    # ---- headline
    w(f"## Headline: batches of {HEADLINE_BATCH}, 1 thread")
    w("")
    w("| transport | op | block | kvferry GB/s | p50 µs | p99 µs | limit GB/s | kvferry / limit | Mooncake tcp GB/s "
      "| kvferry / Mooncake | tcp_limit at the batch's footprint GB/s | kvferry / tcp_limit |")
    w("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    flagged = []
    for t in TRANSPORTS:
        for op in OPS:
            for b in BLOCKS:
                c = results["grid"].get(f"{t}/{op}/{b}/{HEADLINE_BATCH}/1")
                if not c:
                    continue
                if "error" in c:
                    w(f"| {t} | {op} | {fmt_size(b)} | error: {c['error'][:80]} | | | | | | | | |")
                    continue
                lim, _ = limit_for(results, t, op, b, HEADLINE_BATCH, 1)
                tl = tcp_footprint_limit(results, b) if t == "tcp" else None
                moon = mooncake_for(results, op, b) if t != "local" else None
                rl, rm = ratio(c["gbps"], lim), ratio(c["gbps"], moon)
                fl = flag(rl, rm)
                mark = lambda r, k: f"**{g(r)}**" if k in fl else g(r)  # noqa: E731
                w(f"| {t} | {op} | {fmt_size(b)} | {g(c['gbps'])} | {g(c['lat_p50_us'], 0)} | {g(c['lat_p99_us'], 0)} "
                  f"| {g(lim)} | {mark(rl, 'limit')} | {g(moon)} | {mark(rm, 'mooncake')} | {g(tl)} | {g(ratio(c['gbps'], tl))} |")
    w("")
    w("The machine is shared. For every measurement the script computes *others' CPU*: the cores kept busy by "
      "processes other than the benchmark's own during it (machine-wide busy time from /proc/stat less the "
      "benchmark processes' CPU time); a cell where others used more than 0.25 of a core is measured again "
      "(up to 3 attempts) and the quietest attempt is kept. The last table shows the figure per cell: on 2 cores, "
      "0.5 means a quarter of the machine was taken by someone else.")
    w("")
    w("Bold: below 0.9 of the limit, or below Mooncake; discussed below. Mooncake's figure is its engine over "
      "tcp driven by te_pingpong (batches of 32 contiguous blocks): the path a Mooncake user without RDMA gets, "
      "between processes of one host as across hosts.")
    w("")

    # ---- te_pingpong
    pp = results.get("pingpong", {})
    w("## te_pingpong: Mooncake's engine and kvferry's, same script")
    w("")
    cells = ("Every cell is one run (a --quick page)" if results.get("quick") else
             f"Every cell is the median of {PINGPONG_REPEATS} runs in a row (each run's figure is in the raw results)")
    w(f"`tools/te_pingpong.py` (a copy of the shared probe): target in a child process, batches of {HEADLINE_BATCH} "
      "contiguous blocks, 1 thread, through the Mooncake Python API. *kvferry CLI* is the same workload "
      "through `kvferry bench --layout contiguous` (Rust, no Python), to show what the Python layer costs. "
      f"{cells}, for Mooncake, kvferry and the CLI alike; the *iperf3* column is the median of the one-stream "
      "iperf3 runs taken before, between and after the engines' cells (listed under the limits), so that every "
      "ratio compares figures of the same minutes.")
    w("")
    for k, why in pp.get("skipped", {}).items():
        w(f"- **skipped** ({k}): {why}.")
    if pp.get("skipped"):
        w("")
    ip1 = pingpong_iperf3(results)
    w("| op | block | iperf3 GB/s | Mooncake tcp GB/s (p50 µs) | kvferry py tcp GB/s (p50 µs) | kvferry py same-host GB/s (p50 µs) "
      "| kvferry CLI tcp GB/s | kvferry CLI cma GB/s | py tcp / Mooncake | py tcp / iperf3 | py tcp / CLI tcp "
      "| tcp_limit (footprint) GB/s | py tcp / tcp_limit | cma_limit GB/s | py same-host / cma_limit |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for op in OPS:
        for b in BLOCKS:
            mo = pp.get("mooncake", {}).get(f"tcp/{op}/{b}", {})
            pt = pp.get("kvferry_py", {}).get(f"tcp/{op}/{b}", {})
            pa = pp.get("kvferry_py", {}).get(f"ascend/{op}/{b}", {})
            ct = pp.get("kvferry_cli", {}).get(f"tcp/{op}/{b}", {})
            cc = pp.get("kvferry_cli", {}).get(f"cma/{op}/{b}", {})
            if not any([mo, pt, ct]):
                continue
            cl = results["limits"]["cma"]["cells"].get(f"{op}/{b}/{HEADLINE_BATCH}/1", {}).get("median")
            tl = tcp_footprint_limit(results, b)
            cell = lambda r: f"{g(r.get('gbps'))} ({g(r.get('lat_p50_us'), 0)})" if "gbps" in r else ("error" if r else "–")  # noqa: E731
            w(f"| {op} | {fmt_size(b)} | {g(ip1)} | {cell(mo)} | {cell(pt)} | {cell(pa)} | {g(ct.get('gbps'))} | {g(cc.get('gbps'))} "
              f"| {g(ratio(pt.get('gbps'), mo.get('gbps')))} | {g(ratio(pt.get('gbps'), ip1))} | {g(ratio(pt.get('gbps'), ct.get('gbps')))} "
              f"| {g(tl)} | {g(ratio(pt.get('gbps'), tl))} | {g(cl)} | {g(ratio(pa.get('gbps'), cl))} |")
    w("")
    w("![GB/s against block size](benchmarks.png)")
    w("")

    # ---- full grid
    w("## Every cell")
    w("")
    w("| transport | op | block | batch | threads | GB/s | ops/s | p50 µs | p99 µs | p999 µs | limit GB/s | / limit | others' CPU |")
    w("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, c in results["grid"].items():
        t, op, b, n, th = key.split("/")
        b, n, th = int(b), int(n), int(th)
        if "error" in c:
            w(f"| {t} | {op} | {fmt_size(b)} | {n} | {th} | error: {c['error'][:80]} | | | | | | |")
            continue
        lim, _ = limit_for(results, t, op, b, n, th)
        rl = ratio(c["gbps"], lim)
        moon = mooncake_for(results, op, b) if (t != "local" and n == HEADLINE_BATCH and th == 1) else None
        fl = flag(rl, ratio(c["gbps"], moon))
        if fl:
            flagged.append((t, op, b, n, th, rl, fl))
        w(f"| {t} | {op} | {fmt_size(b)} | {n} | {th} | {g(c['gbps'])} | {g(c['ops_per_s'], 0)} | {g(c['lat_p50_us'], 0)} "
          f"| {g(c['lat_p99_us'], 0)} | {g(c['lat_p999_us'], 0)} | {g(lim)} | {('**' + g(rl) + '**') if 'limit' in fl else g(rl)} "
          f"| {g(c.get('others_cpu'), 2)} |")
    w("")

    # ---- limits
    w("## The limits, as measured")
    w("")
    for k, v in sorted(results["limits"]["iperf3"].items()):
        w(f"- iperf3 on 127.0.0.1, {k} stream(s), `-l 1M`: **{v['gbps']:.2f} GB/s**")
    phase = pingpong_iperf3_runs(results)
    if phase:
        w(f"- iperf3 as above, 1 stream, in the te_pingpong phase (before, between and after the engines' cells): "
          f"{', '.join(f'{v:.2f}' for v in phase)} GB/s, median **{statistics.median(phase):.2f}**")
    tf = results["limits"].get("tcp_footprint", {})
    for f, v in sorted(tf.get("gbps", {}).items(), key=lambda kv: int(kv[0])):
        per = ", ".join(f"{n} stream(s) {x:.2f}" for n, x in sorted(tf.get("by_streams", {}).get(f, {}).items()))
        w(f"- tcp_limit, 1 MiB sends through {fmt_size(int(f))} on each side: **{v:.2f} GB/s** (best of: {per})")
    w("- memcpy_limit (context: one memcpy of the whole size, repeated):")
    w("")
    w("| size | threads | best GB/s | median GB/s |")
    w("| --- | ---: | ---: | ---: |")
    for r in results["limits"]["memcpy"]["rows"]:
        w(f"| {r['size']} | {r['threads']} | {r['best']:.2f} | {r['median']:.2f} |")
    w("")
    w("- cma_limit (hot), per cell (median and best of its 5 trials):")
    w("")
    w("| op | block | iovecs/call | threads | median GB/s | best GB/s | µs per call |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    def cma_key(k):
        op, b, n, th = k.split("/")
        return (op, int(b), int(n), int(th))
    for k in sorted(results["limits"]["cma"]["cells"], key=cma_key):
        op, b, n, th = cma_key(k)
        c = results["limits"]["cma"]["cells"][k]
        w(f"| {op} | {fmt_size(b)} | {n} | {th} | {c['median']:.2f} | {c['best']:.2f} | {g(c.get('us_per_call'), 0)} |")
    w("")

    # ---- discussion
    w("## Below target: why, and the planned fix")
    w("")
    if not flagged:
        w("No cell is below 0.9 of its limit or below Mooncake.")
    else:
        sections = discussion_sections()
        groups = {}
        for t, op, b, n, th, rl, fl in flagged:
            groups.setdefault(classify(t, op, b, fl), []).append((t, op, b, n, th, rl, fl))
        for key, cells in groups.items():
            names = ", ".join(f"{t} {op} {fmt_size(b)}×{n}×{th}t ({g(rl)})" for t, op, b, n, th, rl, fl in cells)
            w(f"### {key}: {len(cells)} cell(s)")
            w("")
            w(f"Cells (transport op block×batch×threads (ratio to limit)): {names}.")
            w("")
            w(sections.get(key, "_No discussion written for this group yet: see tools/bench/discussion.md._"))
            w("")
        for key in sections:
            if key.startswith("general"):
                w(sections[key])
                w("")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default=os.path.join(OUT, "tools"), help="where memcpy_limit / cma_limit are built")
    ap.add_argument("--python", default=sys.executable, help="python with matplotlib (and mooncake, kvferry)")
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per kvferry cell")
    ap.add_argument("--pingpong-seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: reduced grid, short durations")
    ap.add_argument("--report-only", action="store_true", help="render the page from target/bench/results.json")
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--wait-quiet", type=float, default=180, help="seconds to wait for load < --max-load")
    ap.add_argument("--command", default="scripts/bench", help="the command line shown on the page")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    raw_path = os.path.join(OUT, "results.json")
    if a.report_only:
        results = json.load(open(raw_path))
    else:
        if a.quick:
            a.duration, a.pingpong_seconds = 0.5, 1.0
        results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "machine": machine(), "quick": a.quick, "load": {}}
        results["commit"] = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
        results["load"]["start"] = wait_quiet(a.max_load, a.wait_quiet)
        log("limits: memcpy_limit")
        results["load"]["limits start"] = wait_quiet(a.max_load, 60)
        limits = {"memcpy": memcpy_limit(a.tools, 0.1 if a.quick else 0.2)}
        log("limits: cma_limit (hot)")
        limits["cma"] = cma_limit(a.tools, [HEADLINE_BATCH] if a.quick else BATCHES,
                                  [16 * KIB, 1 * MIB] if a.quick else BLOCKS, 0.05 if a.quick else 0.2)
        if not a.quick:
            extra = cma_limit(a.tools, sorted({n for _, _, n in EXTRA}), [MIB], 0.2)
            limits["cma"]["cells"].update(extra["cells"])
            limits["cma"]["raw"] += "\n" + extra["raw"]
        log("limits: iperf3")
        limits["iperf3"] = {str(s): measured(lambda: iperf3(s, 2 if a.quick else 4)) for s in ([1] if a.quick else [1, 2])}
        log("iperf3: " + ", ".join(f"{k} stream(s) {v['gbps']:.2f} GB/s" for k, v in limits["iperf3"].items()))
        log("limits: tcp_limit (one stream at each batch footprint)")
        limits["tcp_footprint"] = tcp_limit(a.tools, [MIB] + [b * HEADLINE_BATCH for b in BLOCKS], 0.5 if a.quick else 1)
        log("tcp_limit: " + ", ".join(f"{fmt_size(int(k))} {v:.2f} GB/s" for k, v in limits["tcp_footprint"]["gbps"].items()))
        results["limits"] = limits
        results["load"]["after limits"] = loadavg()
        log("kvferry bench grid")
        results["load"]["grid start"] = wait_quiet(a.max_load, 60)
        results["grid"] = grid(a.duration, a.quick)
        results["load"]["after grid"] = loadavg()
        log("te_pingpong")
        results["load"]["te_pingpong start"] = wait_quiet(a.max_load, 60)
        results["pingpong"] = pingpongs(a.python, a.pingpong_seconds, a.quick)
        results["load"]["end"] = loadavg()
        json.dump(results, open(raw_path, "w"), indent=1)
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    if plot(results, PLOT):
        log(f"wrote {os.path.relpath(PLOT, ROOT)}")
    else:
        log("matplotlib missing: no plot")
    with open(DOC, "w") as f:
        f.write(report(results, a.command))
    log(f"wrote {os.path.relpath(DOC, ROOT)}")


if __name__ == "__main__":
    main()
