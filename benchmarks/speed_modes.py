"""`dfq bench` in exact and fast mode against the official loops' speed on this CPU (the issue's reference table).

Each configuration runs in its own process (`dfq bench --json`), so peak RSS is its own. Random weights: timings do
not depend on them. The official figures are those measured side by side on this machine (median of 30 iterations
after warm-up, 2 threads); the targets are 1.25x their throughput in exact mode and 2x in fast mode.

Usage: python benchmarks/speed_modes.py [--iters 30] [--configs adadfq:16 adadfq:64 gdfq:200]
Writes benchmarks/results/speed_modes.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import run_cli, write_result

OFFICIAL_MS = {("adadfq", 16): 141.0, ("adadfq", 64): 521.0, ("gdfq", 200): 1597.0}  # GDFQ: CIFAR-100 config
TARGET_SPEEDUP = {False: 1.25, True: 2.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=["adadfq:16", "adadfq:64", "gdfq:200"])
    args = parser.parse_args()
    rows = []
    for item in args.configs:
        method, batch = item.split(":")
        iters = args.iters if int(batch) <= 64 else max(5, args.iters // 3)
        for fast in (False, True):
            cmd = ["bench", "resnet20a_cifar10", "--method", method, "--batch-size", batch, "--iters", str(iters)]
            r = run_cli([*cmd, *(["--fast"] if fast else [])])
            official = OFFICIAL_MS.get((method, int(batch)))
            if official:
                r["official_ms"] = official
                r["speedup_vs_official"] = round(official / r["ms_median"], 3)
                r["target_speedup"] = TARGET_SPEEDUP[fast]
                r["target_met"] = r["speedup_vs_official"] >= TARGET_SPEEDUP[fast]
            r["command"] = "dfq " + " ".join(cmd) + (" --fast" if fast else "")
            rows.append(r)
            print(json.dumps(r), flush=True)
    path = write_result("speed_modes", {"model": "resnet20a_cifar10", "results": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
