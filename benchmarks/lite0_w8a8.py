"""EfficientNet-Lite0 at W8A8 on the runtime: which data-free method keeps it within 0.3 points in ONNX Runtime.

The target is a drop of at most 0.3 points with at least 97% top-1 agreement with full precision, in at most ten
minutes of data-free time on a 2-core CPU, for the model that ships: the ONNX Runtime export, whose `QLinearConv`
requantizes differently from PyTorch's Q near rounding ties (docs/results.md). Each setting runs as a row of
``zoo_deploy.py`` does (deploy protocol, seed 0, export with a parity check, P, Q and the export on the 1,000
ImageNet photos).

Usage: python benchmarks/lite0_w8a8.py [--settings zeroq-8x25 zeroq-32x50 squant cle]
Writes benchmarks/results/lite0_w8a8.json after each setting, keeping the rows of settings this run does not redo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import IMAGENET, LITE0, RESULTS, write_result
from zoo_deploy import run_setting

import dfq
from dfq.errors import DFQError

SETTINGS = {
    "zeroq-8x25": dfq.methods.ZeroQConfig(num_samples=8, steps=25),  # zoo_deploy.json's Lite0 row
    "zeroq-32x50": dfq.methods.ZeroQConfig(num_samples=32, steps=50),
    "squant": dfq.methods.SQuantConfig(),
    "cle": dfq.methods.CLEConfig(),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    missing = [str(p) for p in (LITE0, IMAGENET) if not p.is_file()]
    if missing:
        print(f"skipped: not found: {', '.join(missing)}", file=sys.stderr)
        return 0
    old = RESULTS / "lite0_w8a8.json"
    previous = json.loads(old.read_text())["rows"] if old.is_file() else []
    rows = [r for r in previous if r["setting"] not in args.settings]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            print(name, flush=True)
            try:
                row = {"setting": name, **run_setting("lite0", 8, 8, SETTINGS[name], 16, Path(tmp), None)}
            except DFQError as e:  # a failure is a result too: the row keeps dfq's one-line message
                row = {"setting": name, "error": str(e)}
            row["command"] = " ".join([Path(sys.executable).name, *sys.argv])
            rows.append(row)
            keys = ("setting", "error", "data_free_seconds", "top1_fp", "top1_q_pytorch", "top1_q_onnx",
                    "agreement_q_with_fp", "agreement_onnx_with_q", "agreement_onnx_with_fp")  # fmt: skip
            print({k: row[k] for k in keys if k in row}, flush=True)
            write_result("lite0_w8a8", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
