"""Collect finished run directories' summaries and resolved configs into one result file.

Usage: python benchmarks/run_summaries.py NAME RUN_DIR... [--jpeg]
Writes benchmarks/results/NAME.json: per run, its summary.json (top-1 on the set passed with --data, seconds), the
quant and method sections of its config.yaml, a mixed-precision run's allocation.json and, with --jpeg, top-1 on the
JPEG-75 CIFAR-10 set (`dfq eval`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from _common import JPEG, cli_top1, write_result


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--jpeg"]
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
        rows.append(row)
        print(json.dumps({"run": str(run), "top1": row["summary"].get("top1")}), flush=True)
    print(f"wrote {write_result(name, {'runs': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
