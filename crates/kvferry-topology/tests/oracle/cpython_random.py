"""Oracle for tests/cpython_random.rs: runs CPython's own `random` module.

Reads one JSON document from stdin:
  {"cases": [{"seed": "<int, decimal or 0x-hex, may be negative>",
              "n": <population>, "k": <sample size>,
              "bits": [<getrandbits widths>], "below": [<_randbelow bounds>]}],
   "setsize_k": [<sample sizes>]}
and prints one line per case, "<sample> | <getrandbits as hex> | <randbelow>",
each part space-separated, then one line per setsize_k entry with CPython's
sample() switch point, computed by the same expression Lib/random.py uses.
"""
import json
import math
import random
import sys


def setsize(k):
    # Lib/random.py, Random.sample (3.11): kept textually identical.
    size = 21
    if k > 5:
        size += 4 ** math.ceil(math.log(k * 3, 4))
    return size


def main():
    doc = json.load(sys.stdin)
    out = []
    for case in doc["cases"]:
        rng = random.Random(int(case["seed"], 0))
        sample = rng.sample(range(case["n"]), case["k"])
        bits = [format(rng.getrandbits(b), "x") for b in case["bits"]]
        below = [rng._randbelow(m) for m in case["below"]]
        out.append(" ".join(map(str, sample)) + " | " + " ".join(bits) + " | "
                   + " ".join(map(str, below)))
    for k in doc["setsize_k"]:
        out.append(str(setsize(k)))
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
