"""Accuracy cost of the deploy protocol against the papers' protocol, same method, bits, schedule and seed.

Each argument is a pair PAPER_RUN:DEPLOY_RUN of finished run directories (made with the same command except
`--protocol`); both final models are evaluated on both test sets.

Usage: python benchmarks/protocol_cost.py runs/paper/zeroq-w4a4:runs/deploy/zeroq-w4a4 ...
Writes benchmarks/results/protocol_cost.json, replacing only the rows of the same method and bits (each row keeps
the command that measured it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import RESULTS, cli_top1, command, write_result


def top1(run: Path) -> dict[str, float]:
    return cli_top1([str(run)])


def merged(rows: list[dict]) -> list[dict]:
    """Earlier rows of other methods or bits, then these rows."""
    path = RESULTS / "protocol_cost.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    key = lambda r: (r["method"], r["wbits"], r["abits"])  # noqa: E731
    new = {key(r) for r in rows}
    kept = [{"command": old.get("command"), **r} for r in old.get("pairs", []) if key(r) not in new]
    return kept + rows


def main() -> int:
    pairs = [tuple(Path(p) for p in arg.split(":")) for arg in sys.argv[1:]]
    if not pairs or any(len(p) != 2 for p in pairs):
        print(__doc__, file=sys.stderr)
        return 2
    rows = []
    for paper, deploy in pairs:
        summary = json.loads((deploy / "summary.json").read_text())
        a, b = top1(paper), top1(deploy)
        rows.append({
            "method": summary["method"], "wbits": summary["wbits"], "abits": summary["abits"],
            "command": command(), "paper_run": str(paper), "deploy_run": str(deploy), "paper": a, "deploy": b,
            "deploy_minus_paper": {k: round(b[k] - a[k], 3) for k in a},
        })  # fmt: skip
        print(json.dumps(rows[-1]))
    print(f"wrote {write_result('protocol_cost', {'model': 'resnet20a_cifar10', 'pairs': merged(rows)})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
