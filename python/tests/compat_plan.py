"""COMPAT.md section 2 transcribed into plain Python, in the shape of the
loop the vllm-ascend connectors run for every request today: group the
paired block ids into runs, then for every layer and cache append one
(local, remote, length) triple per run.

The reference test_topology.py compares kvferry's plans with (op for op, in
order), and the baseline benches/topology_python.py times. Written from the
rules text; `scale` (kernel blocks per logical block) follows the decision
in crates/kvferry-topology/README.md: logical block b is kernel blocks
b*scale .. b*scale + scale - 1. Inputs are assumed valid (the connectors do
not check them either).
"""


def pair_remote_ids(local_ids, remote_ids, computed_tokens=None, tokens_per_block=None, trim_remote_head=False):
    """The remote ids that pair one to one with `local_ids`."""
    if computed_tokens is not None:
        return remote_ids[computed_tokens // tokens_per_block :]
    if trim_remote_head:
        return remote_ids[len(remote_ids) - len(local_ids) :]
    return remote_ids


def group_runs(local_ids, remote_ids, pulls):
    """[local_start, remote_start, count] runs, cut wherever either side
    steps by anything but +1; with pulls > 1 every pair is its own run."""
    runs = []
    for l, r in zip(local_ids, remote_ids):
        if pulls == 1 and runs:
            last = runs[-1]
            if l == last[0] + last[2] and r == last[1] + last[2]:
                last[2] += 1
                continue
        runs.append([l, r, 1])
    return runs


def plan(local_caches, remote_caches, local_ids, remote_ids, pulls=1, offset_index=0, split="local", **prefix):
    """(local_addrs, remote_addrs, lengths) for one pull or push.

    `local_caches` / `remote_caches`: every layer's caches, flattened layer
    by layer, each `(base, block_len, stride, scale)`.
    """
    remote_ids = pair_remote_ids(local_ids, remote_ids, **prefix)
    runs = group_runs(local_ids, remote_ids, pulls)
    local_addrs, remote_addrs, lengths = [], [], []
    for (lbase, llen, lstride, scale), (rbase, rlen, rstride, _) in zip(local_caches, remote_caches):
        # ib = block_len / n of the side whose block holds n slices.
        if split == "local":
            ib = llen // pulls
            loff, roff = offset_index * ib, 0
        else:
            ib = rlen // pulls
            loff, roff = 0, offset_index * ib
        if pulls == 1 and lstride == llen and rstride == rlen:
            # Byte-contiguous on both sides: one op per run.
            for l, r, k in runs:
                local_addrs.append(lbase + l * scale * lstride + loff)
                remote_addrs.append(rbase + r * scale * rstride + roff)
                lengths.append(ib * k * scale)
        else:
            for l, r, k in runs:
                for j in range(k * scale):
                    local_addrs.append(lbase + (l * scale + j) * lstride + loff)
                    remote_addrs.append(rbase + (r * scale + j) * rstride + roff)
                    lengths.append(ib)
    return local_addrs, remote_addrs, lengths
