"""Collect finished run directories' summaries and resolved configs into one result file.

Usage: python benchmarks/run_summaries.py NAME RUN_DIR... [--jpeg] [--parity]
Writes benchmarks/results/NAME.json: per run, its summary.json (top-1 on the set passed with --data, seconds), the
quant and method sections of its config.yaml, a mixed-precision run's allocation.json, with --jpeg top-1 on the
JPEG-75 CIFAR-10 set (`dfq eval`), and with --parity the ONNX Runtime parity report of its export on the first 1,000
images of the 4-class lossless CIFAR-10 set (`dfq export RUN --verify`: top-1 agreement, the largest logit
difference, and the sites where codes differ, with the share of codes and the largest difference in steps).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml
from _common import JPEG, LOSSLESS, cli_top1, run_cli, write_result


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in ("--jpeg", "--parity")]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    name, runs = args[0], [Path(a).resolve() for a in args[1:]]
    rows = []
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        row = {"run": str(run), "summary": json.loads((run / "summary.json").read_text()),
               "quant": config["quant"], "method": config["method"]}  # fmt: skip
        if (run / "allocation.json").is_file():  # a mixed-precision run: the chosen bits and their costs
            row["allocation"] = json.loads((run / "allocation.json").read_text())
        if "--jpeg" in sys.argv:
            row["top1_jpeg75"] = cli_top1([str(run)], {"jpeg75": JPEG})["jpeg75"]
        if "--parity" in sys.argv:
            row["parity"] = _parity(run)
        rows.append(row)
        print(json.dumps({"run": str(run), "top1": row["summary"].get("top1")}), flush=True)
    print(f"wrote {write_result(name, {'runs': rows})}")
    return 0


def _parity(run: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = run_cli(["export", str(run), "--out", f"{tmp}/m.onnx", "--verify", "--data", str(LOSSLESS),
                       "--limit", "1000"])  # fmt: skip
    verify = out["verify"]
    return {**{k: v for k, v in verify.items() if k != "sites"}, "integer_ops": out["integer_ops"],
            "sites_differing": [s for s in verify["sites"] if s["mismatch"]]}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
