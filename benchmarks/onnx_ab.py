"""Two ONNX files of one model timed against each other on ONNX Runtime, interleaved in one process.

On a shared machine, two runs of a throughput benchmark minutes apart differ by more than many changes do; timing
both files in turns, run after run, exposes them to the same load, so their ratio is what the change did.

Usage: python benchmarks/onnx_ab.py NAME A.onnx B.onnx [--threads 2] [--size 224] [--note TEXT]
Writes benchmarks/results/NAME.json: median latency of each file at batch 1 (60 turns) and 64 (12 turns), and B / A.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _common import write_result

from dfq.export.runtime import session

TURNS = {1: 60, 64: 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="input side (3 channels)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    sessions = {f: session(f, threads=args.threads) for f in (args.a, args.b)}  # as dfq eval and the benchmarks run
    name = sessions[args.a].get_inputs()[0].name
    rows = []
    for batch, turns in TURNS.items():
        x = np.random.default_rng(0).standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
        times: dict[str, list[float]] = {f: [] for f in sessions}
        for s in sessions.values():
            s.run(None, {name: x})  # warm-up
        for _ in range(turns):
            for f, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {name: x})
                times[f].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[f]) * 1000 for f in (args.a, args.b))
        rows.append({"batch": batch, "turns": turns, "a_ms": round(a, 3), "b_ms": round(b, 3),
                     "b_over_a": round(b / a, 3)})  # fmt: skip
        print(rows[-1], flush=True)
    payload = {"a": args.a, "b": args.b, "threads": args.threads, "note": args.note, "rows": rows}
    print(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
