"""Peak memory of ``recon`` at 224 px: pool activations in memory against memory-mapped files (``memory_mb``).

torchvision's ResNet-18 at random weights (BatchNorm statistics from one train-mode forward), W4A4 deploy, a pool of
``--samples`` images at 224x224 with short synthesis and reconstruction (memory, not accuracy, is measured). Each
setting runs in its own process, which reports its peak resident set size (``ru_maxrss``: file-backed pages count
too, although the OS can write them back and evict them) and its wall time. With ``--limit-mb`` each process runs in
a cgroup-v1 memory cgroup of that limit (root only), which shows what completes under the limit and the cgroup's peak.

Usage: python benchmarks/recon_memory.py [--samples 256] [--settings 100000 1024 256] [--limit-mb 3000]
Writes benchmarks/results/recon_memory.json (with ``--limit-mb``: recon_memory_cgroup.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result


def child(samples: int, memory_mb: int) -> None:
    import torch

    import dfq

    torch.manual_seed(0)
    p = dfq.create_model("tv:resnet18")
    p.train()(torch.randn(16, 3, 224, 224))
    config = dfq.methods.ReconConfig(num_samples=samples, synth_batch=32, synth_steps=1, iters=2, batch_size=8,
                                     memory_mb=memory_mb)  # fmt: skip
    start = time.perf_counter()
    dfq.quantize(p.eval(), dfq.QuantConfig(wbits=4, abits=4, protocol="deploy"), config, progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"memory_mb": memory_mb, "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1)}))


def run_child(cmd: list[str], memory_mb: int, limit_mb: int | None) -> dict:
    """One setting in its own process (in a memory cgroup of ``limit_mb`` when given)."""
    if limit_mb is None:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        return json.loads(out)
    group = Path(f"/sys/fs/cgroup/memory/dfq-recon-memory-{os.getpid()}")
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
        join = lambda: (group / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=join)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        lines = proc.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"memory_mb": memory_mb}
        return {**row, "completed": proc.returncode == 0, "returncode": proc.returncode, "cgroup_peak_mb": round(peak)}
    finally:
        group.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--settings", type=int, nargs="+", default=[100000, 1024, 256])
    parser.add_argument("--child", type=int)
    parser.add_argument("--limit-mb", type=int, help="run each setting in a memory cgroup of this limit")
    args = parser.parse_args()
    if args.child is not None:
        child(args.samples, args.child)
        return 0
    rows = []
    for memory_mb in args.settings:
        cmd = [sys.executable, __file__, "--samples", str(args.samples), "--child", str(memory_mb)]
        rows.append(run_child(cmd, memory_mb, args.limit_mb))
        print(rows[-1], flush=True)
    name = "recon_memory" if args.limit_mb is None else "recon_memory_cgroup"
    write_result(name, {"model": "tv:resnet18", "input": 224, "samples": args.samples,
                                  "cgroup_limit_mb": args.limit_mb, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
