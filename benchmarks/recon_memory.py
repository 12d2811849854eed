"""Memory of ``recon`` at 224 px against the size of its synthetic pool.

torchvision's ResNet-18 at random weights (BatchNorm statistics from one train-mode forward), W4A4 deploy, pools of
``--samples`` images at 224x224 with short synthesis and reconstruction (memory, not accuracy, is measured). Each
pool size runs in its own process, which reports its wall time, its peak resident set (``ru_maxrss``: file pages
included, so it grows with whatever the process reads, reclaimable or not) and the peak of its anonymous memory
(``RssAnon`` sampled every 20 ms: what cannot be paged out without swap). ``--spill-mb`` sets ``method.spill_mb``
(a huge value keeps every activation in memory). With ``--limit-mb``, each process runs in the cgroup-v1 memory
group ``--cgroup`` limited to that many MB, and the row says whether it finished or was killed. With
``--cli-allocator`` each process first sets glibc's allocator up as the CLI does (``dfq.utils.allocator``).

Usage: python benchmarks/recon_memory.py [--samples 64 256 1024] [--spill-mb MB] [--limit-mb MB] [--label NAME]
       [--cli-allocator]
Writes (or extends) benchmarks/results/recon_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import RESULTS, write_result


def _anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def child(samples: int, spill_mb: float, cli_allocator: bool) -> None:
    import torch

    import dfq
    from dfq.utils.allocator import reuse_freed_memory

    if cli_allocator and not reuse_freed_memory():
        sys.exit("recon_memory: glibc's allocator could not be set up as the CLI does")

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _anon_kb())

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    p = dfq.create_model("tv:resnet18")
    p.train()(torch.randn(16, 3, 224, 224))
    config = dfq.methods.ReconConfig(num_samples=samples, synth_batch=32, synth_steps=1, iters=2, batch_size=8,
                                     spill_mb=spill_mb)  # fmt: skip
    start = time.perf_counter()
    dfq.quantize(p.eval(), dfq.QuantConfig(wbits=4, abits=4, protocol="deploy"), config, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    anon_mb = max(peak[0], _anon_kb()) / 1024
    row = {
        "samples": samples,
        "peak_rss_mb": round(rss_mb),
        "peak_anon_mb": round(anon_mb),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(row))


def _run(samples: int, spill_mb: float, cgroup: Path | None, cli_allocator: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(samples), "--spill-mb", str(spill_mb)]
    cmd += ["--cli-allocator"] if cli_allocator else []

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter)
    if proc.returncode != 0:
        return {"samples": samples, "completed": False, "returncode": proc.returncode}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "completed": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--spill-mb", type=float, default=128.0)
    parser.add_argument("--limit-mb", type=int)
    parser.add_argument("--cgroup", type=Path, default=Path("/sys/fs/cgroup/memory/dfqtest"))
    parser.add_argument("--label", default="default")
    parser.add_argument("--cli-allocator", action="store_true", help="set glibc's allocator up as the CLI does")
    parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.spill_mb, args.cli_allocator)
        return 0
    cgroup = None
    if args.limit_mb:
        cgroup = args.cgroup
        (cgroup / "memory.limit_in_bytes").write_text(str(args.limit_mb * 2**20))
    rows = []
    for samples in args.samples:
        row = _run(samples, args.spill_mb, cgroup, args.cli_allocator)
        rows.append({"spill_mb": args.spill_mb, "limit_mb": args.limit_mb, **row})
        print(rows[-1], flush=True)
    if cgroup is not None:
        (cgroup / "memory.limit_in_bytes").write_text("-1")
    previous = RESULTS / "recon_memory.json"
    series = json.loads(previous.read_text()).get("series", {}) if previous.exists() else {}
    series[args.label] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}
    write_result("recon_memory", {"model": "tv:resnet18", "input": 224, "series": series})
    return 0


if __name__ == "__main__":
    sys.exit(main())
