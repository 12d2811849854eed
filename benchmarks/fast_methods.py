"""The fast post-training methods (`cle`, `squant`, `zeroq`, `gptq`) on the CIFAR-10 models, deploy protocol.

Usage: python benchmarks/fast_methods.py [--methods cle zeroq] [--bits 8] [--abits A] [--models M ...]
       [--set KEY=VALUE ...] [--seeds 0 ...] [--protocol deploy] [--append]
Writes benchmarks/results/fast_methods.json: per model, method and bit-width the final top-1 on the lossless 4-class
set (and JPEG-75 for ResNet-20), the full-precision top-1 beside it, and the data-free seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from _common import JPEG, LOSSLESS, RESULTS, SHARED_DATA, WEIGHTS, cli_top1, run_cli, write_result

MODELS = {
    "resnet20a_cifar10": (WEIGHTS, {"lossless": LOSSLESS, "jpeg75": JPEG}),
    "resnet8_mlperf_cifar10": (SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt", {"lossless": LOSSLESS}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["cle", "zeroq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[8])
    parser.add_argument("--abits", type=int, default=None, help="activation bits (default: the weights' --bits)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--set", dest="settings", nargs="*", default=[], help="method settings passed to --set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--protocol", choices=["deploy", "paper"], default="deploy")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the result file")
    args = parser.parse_args()
    paths = [*(w for w, _ in MODELS.values()), LOSSLESS, JPEG]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            weights, sets = MODELS[model]
            fp = cli_top1([model, "--weights", str(weights)], sets)
            for method, bits, seed in itertools.product(args.methods, args.bits, args.seeds):
                out = Path(tmp) / f"{model}-{method}-{bits}-{seed}"
                abits = args.abits or bits
                cmd = ["quantize", model, "--method", method, "--wbits", str(bits), "--abits", str(abits),
                       "--protocol", args.protocol, "--seed", str(seed), "--weights", str(weights),
                       "--out", str(out)]  # fmt: skip
                cmd += [arg for item in args.settings for arg in ("--set", item)]
                summary = run_cli(cmd)
                top1 = cli_top1([str(out)], sets)
                row = {"model": model, "method": method, "bits": bits, "abits": abits, "protocol": args.protocol,
                       "seed": seed, "seconds": summary["seconds"], "top1": top1, "fp_top1": fp,
                       "settings": args.settings, "command": "dfq " + " ".join(cmd)}  # fmt: skip
                print(row, flush=True)
                rows.append(row)
    path = RESULTS / "fast_methods.json"
    if args.append and path.is_file():
        rows = [*json.loads(path.read_text())["rows"], *rows]
    print(f"wrote {write_result('fast_methods', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
