"""A direct Python transcription of the rank-mapping rules in COMPAT.md section 3.

Written from the rules text, using CPython's real `random` and `hashlib`, as
the reference tests/rules_oracle.rs compares the Rust crate against. The
rejections at the top are kvferry's documented decisions (README.md,
"Rejected shapes"); everything else is the connectors' rule, line by line.

Reads one JSON document from stdin:
  {"shapes": [[P, D, H, "gqa"|"mla"|"sparse", S], ...],
   "request_ids": [...], "request_indices": [...]}
and prints, for every shape:
  "shape P D H kind S"
  then "reject" if kvferry must reject it for both mappings, otherwise
  "pull reject" if only the pull mapping rejects it, or
  "n <pulls per rank>" and one line per request id: the decode rank lists,
    ranks joined by ",", lists by ";"
  then one line per request index q: for each prefill rank p,
    "<decode ranks joined by ','>/<offset index>", joined by ";"
"""
import hashlib
import json
import random
import sys


def rejected(P, D, H, kind, S):
    if P < 1 or D < 1 or S < 1:
        return True
    if kind != "mla" and H < 1:
        return True
    if P < D:
        return True
    if kind == "gqa":
        for tp in (P, D):
            if tp % H != 0 and H % tp != 0:
                return True
        if P < H and P % D != 0:
            return True
    return False


def pulls_per_rank(P, D, H, kind):
    if kind == "mla":
        return 1
    return max(1, H // D) // max(1, H // P)


def seed_of(request_id):
    return int.from_bytes(hashlib.sha256(request_id.encode("utf-8")).digest()[:8], "little")


def pull_lists(P, D, H, kind, S, request_id):
    """The decode rank lists, or None where the rules do not give every
    decode rank n ranks per stage (kvferry rejects those shapes)."""
    n = pulls_per_rank(P, D, H, kind)
    if P == D:
        return [[i + s * P for s in range(S)] for i in range(P)]
    h = 1 if kind in ("mla", "sparse") else H
    rng = random.Random(seed_of(request_id))
    G = max(1, P // h)
    C = rng.sample(range(G), max(D // h, 1))
    lists = [[] for _ in range(D)]
    for s in range(S):
        if P > H or kind in ("mla", "sparse"):
            if P % G != 0:
                return None
            M = [[s * P + r * G + c for c in range(G)] for r in range(P // G)]
            flat = [M[r][c] for r in range(P // G) for c in C]
            chunks = [flat[i:i + n] for i in range(0, len(flat), n)]
            if len(chunks) != D or any(len(chunk) != n for chunk in chunks):
                return None
        else:
            k = P // D
            chunks = [[s * P + i * k + j for j in range(k)] for i in range(D)]
        for i in range(D):
            lists[i].extend(chunks[i])
    return lists


def heads_of(tp, H, r):
    if tp <= H:
        return set(range(r * H // tp, (r + 1) * H // tp))
    return {r // (tp // H)}


def replica_groups(tp, H):
    step = tp // H
    if step == 0:
        return [list(range(tp))]
    return [[h * step + i for h in range(H)] for i in range(step)]


def push_targets(P, D, H, kind, q, p):
    if kind in ("mla", "sparse"):
        H = 1
    pg, dg = replica_groups(P, H), replica_groups(D, H)
    ratio = len(pg) // len(dg)
    active = pg if ratio == 0 else pg[(q % ratio) * len(dg):(q % ratio) * len(dg) + len(dg)]
    targets = []
    for m, group in enumerate(active):
        if p in group and m < len(dg):
            targets = sorted(d for d in dg[m] if heads_of(D, H, d) & heads_of(P, H, p))
    if kind in ("mla", "sparse") or P == D:
        offset = 0
    else:
        num_head_replica = P // H if P >= H else 1
        pd_head_ratio = min(P, H) // min(D, H)
        offset = (p // num_head_replica) % pd_head_ratio
    return targets, offset


def main():
    doc = json.load(sys.stdin)
    out = []
    for P, D, H, kind, S in doc["shapes"]:
        out.append(f"shape {P} {D} {H} {kind} {S}")
        if rejected(P, D, H, kind, S):
            out.append("reject")
            continue
        per_request = [pull_lists(P, D, H, kind, S, rid) for rid in doc["request_ids"]]
        if any(lists is None for lists in per_request):
            out.append("pull reject")
        else:
            out.append(f"n {pulls_per_rank(P, D, H, kind)}")
            for lists in per_request:
                out.append(";".join(",".join(map(str, l)) for l in lists))
        for q in doc["request_indices"]:
            parts = []
            for p in range(P):
                targets, offset = push_targets(P, D, H, kind, q, p)
                parts.append(",".join(map(str, targets)) + f"/{offset}")
            out.append(";".join(parts))
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
