"""Peak memory of ``recon`` at 224 px against the size of its synthetic pool.

torchvision's ResNet-18 at random weights (BatchNorm statistics from one train-mode forward), W4A4 deploy, pools of
``--samples`` images at 224x224 with short synthesis and reconstruction (memory, not accuracy, is measured).
Reconstruction holds three pool-sized activation tensors at a unit boundary, so the peak grows with the pool. Each
pool size runs in its own process, which reports its peak resident set size (``ru_maxrss``) and its wall time.

Usage: python benchmarks/recon_memory.py [--samples 64 128 256]
Writes benchmarks/results/recon_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import write_result


def child(samples: int) -> None:
    import torch

    import dfq

    torch.manual_seed(0)
    p = dfq.create_model("tv:resnet18")
    p.train()(torch.randn(16, 3, 224, 224))
    config = dfq.methods.ReconConfig(num_samples=samples, synth_batch=32, synth_steps=1, iters=2, batch_size=8)
    start = time.perf_counter()
    dfq.quantize(p.eval(), dfq.QuantConfig(wbits=4, abits=4, protocol="deploy"), config, progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": samples, "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--child", type=int)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    rows = []
    for samples in args.samples:
        cmd = [sys.executable, __file__, "--child", str(samples)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    write_result("recon_memory", {"model": "tv:resnet18", "input": 224, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
