"""Is the official W3A3 run's JPEG-75 figure a separate discrepancy, or its lossless figure seen through JPEG-75?

Every W3A3 model that dfq's AdaDFQ/AdaSG game produced on resnet20a_cifar10 (the fidelity runs in
`fidelity_adadfq.json`, the 10-minute method-study runs in `method_study.json`) gives one (lossless, JPEG-75) pair
of final top-1. A least-squares line through them says how JPEG-75 moves with lossless accuracy for these models;
the official run's pair is then compared with the line's prediction at its lossless top-1, in units of the
line's residual standard deviation. No training runs here: the inputs are committed measurements.

Usage: python benchmarks/fidelity_jpeg_relation.py  (writes benchmarks/results/fidelity_jpeg_relation.json)
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _common import RESULTS, write_result
from fidelity_adadfq import OFFICIAL

GAME = ("adadfq", "adasg")


def w3a3_pairs() -> list[dict]:
    rows = []
    for r in json.loads((RESULTS / "fidelity_adadfq.json").read_text())["results"]:
        if r["wbits"] == 3:
            rows.append({"source": f"fidelity_adadfq.json:{r['run']}", **r["final"]})
    for r in json.loads((RESULTS / "method_study.json").read_text())["results"]:
        if r["method"] in GAME and r["wbits"] == 3:
            rows.append({"source": f"method_study.json:{r['method']}", "lossless": r["lossless"]["top1"],
                         "jpeg75": r["jpeg75"]["top1"]})  # fmt: skip
    return rows


def main() -> int:
    rows = w3a3_pairs()
    x = np.array([r["lossless"] for r in rows])
    y = np.array([r["jpeg75"] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    resid_sd = float(np.std(y - (slope * x + intercept), ddof=2))
    official = OFFICIAL[3]
    predicted = slope * official["lossless"] + intercept
    off = official["jpeg75"] - predicted
    fidelity = [r for r in rows if r["source"].startswith("fidelity")]
    gaps = [(r["lossless"] - official["lossless"], r["jpeg75"] - official["jpeg75"]) for r in fidelity]
    payload = {
        "model": "resnet20a_cifar10",
        "bits": "W3A3",
        "dfq_models": rows,
        "fit": {
            "slope": round(float(slope), 3),
            "intercept": round(float(intercept), 2),
            "residual_sd": round(resid_sd, 2),
            "n": len(rows),
        },
        "official": {
            "lossless": official["lossless"],
            "jpeg75": official["jpeg75"],
            "jpeg75_predicted_from_lossless": round(float(predicted), 2),
            "residual": round(float(off), 2),
            "residual_in_sd": round(float(off) / resid_sd, 2),
        },
        "fidelity_gaps_predicted_by_slope": [
            {"lossless_gap": round(dl, 2), "jpeg75_gap": round(dj, 2), "jpeg75_gap_from_slope": round(slope * dl, 2)}
            for dl, dj in gaps
        ],
    }
    path = write_result("fidelity_jpeg_relation", payload)
    print(json.dumps(payload["fit"]), json.dumps(payload["official"]), sep="\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
