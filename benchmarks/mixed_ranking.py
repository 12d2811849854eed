"""Does the predicted loss of a bit allocation rank allocations as their measured accuracy does?

Usage: python benchmarks/mixed_ranking.py SWEEP_DIR [--model M --weights W --data NPZ --pool N --name NAME]

SWEEP_DIR is a finished `dfq sweep` (its first mixed point's sensitivity.json holds the measured losses). Two
rankings, each reported as Spearman and Kendall rank correlations between the predicted loss (the sum of the
chosen tensors' sensitivities) and the measured top-1:
- *calibrated*: uniform allocations and the solver's allocations at the size and BOPs of several uniform
  settings, each quantized without reconstruction (least-error grids calibrated on a fresh synthetic pool, the
  start of `recon`), evaluated on the real test set; also the KL divergence each one measures on that pool.
- *recon*: the sweep's own runs (the default method, uniform and mixed).
It also reports the sensitivity pass's cost against the quantization time of the mixed runs.
Writes benchmarks/results/NAME.json (default mixed_ranking).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import LOSSLESS, WEIGHTS, top1_on, write_result
from scipy.stats import kendalltau, spearmanr

from dfq.api import describe, from_preprocessing
from dfq.generators import synthesize_pool
from dfq.methods.recon import init_grids
from dfq.mixed import Problem, Sensitivity, parse_uniform, solve, tensors_of
from dfq.mixed.allocate import Allocation
from dfq.models import create_model
from dfq.quant import QuantConfig, quantize_model

UNIFORM = ["W8A8", "W6A6", "W5A5", "W4A8", "W4A5", "W4A4", "W3A4", "W3A3"]
BUDGETS = ["W6A6", "W5A5", "W4A5", "W4A4", "W3A4", "W3A3"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--model", default="resnet20a_cifar10")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--data", type=Path, default=LOSSLESS)
    ap.add_argument("--pool", type=int, default=256, help="calibration images (synthesized, seed 1)")
    ap.add_argument("--name", default="mixed_ranking")
    args = ap.parse_args()
    p = create_model(args.model, weights=args.weights)
    input_size, _ = describe(p)
    quant, stats = from_preprocessing(p, QuantConfig())
    tensors = tensors_of(p, quant, input_size)
    cache = sorted(args.sweep.glob("mixed-*/sensitivity.json"))[0]
    sensitivity = Sensitivity.from_dict(json.loads(cache.read_text()))
    options = {c: tuple(sorted(row)) for c, row in sensitivity.loss.items()}
    problem = Problem(tensors, options, sensitivity.loss)

    allocations = {}
    for setting in UNIFORM:
        bits = tensors.uniform(*parse_uniform(setting))
        if problem.fits(bits):
            allocations[f"uniform {setting}"] = bits
    for setting in BUDGETS:
        uniform = tensors.uniform(*parse_uniform(setting))
        budgeted = dataclasses.replace(problem, max_weight_bits=tensors.weight_bits(uniform),
                                       max_bops=tensors.bops(uniform))  # fmt: skip
        allocations[f"mixed at {setting}"] = solve(budgeted)

    pool = synthesize_pool(p, input_size, args.pool, generator=torch.Generator().manual_seed(1), input_stats=stats,
                           progress=False)  # fmt: skip
    with torch.no_grad():
        reference = F.log_softmax(p(pool), dim=1)
    rows = []
    for name, bits in allocations.items():
        overrides = Allocation(bits, 0.0, 0, 0, {}, 0.0).overrides()
        q = quantize_model(p, dataclasses.replace(quant, overrides=overrides, weight_scales="stored")).eval()
        init_grids(q, pool, 128)
        with torch.no_grad():
            kl = float(F.kl_div(F.log_softmax(q(pool), dim=1), reference, log_target=True, reduction="batchmean"))
        row = {"allocation": name, "predicted_loss": problem.predicted(bits), "measured_kl": kl,
               "weight_bytes": tensors.weight_bits(bits) / 8, "bops": tensors.bops(bits),
               "top1": top1_on(q, {"test": args.data})["test"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    recon = _recon_points(args.sweep, tensors, problem)
    additivity = _correlation([r["predicted_loss"] for r in rows], [r["measured_kl"] for r in rows])
    result = {
        "model": args.model,
        "data": args.data.name,
        "sensitivity_cache": str(cache),
        "fp_top1": top1_on(p, {"test": args.data})["test"],
        "calibrated": {"rows": rows, **_ranks(rows), "kl_additivity": additivity},
        "recon": {"rows": recon, **_ranks(recon)},
        "sensitivity_cost": _costs(args.sweep),
    }
    print(f"wrote {write_result(args.name, result)}")


def _recon_points(sweep: Path, tensors, problem: Problem) -> list[dict]:
    rows = []
    for run in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(run.read_text())
        alloc = run.parent / "allocation.json"
        if alloc.is_file():
            bits = json.loads(alloc.read_text())["bits"]
        else:
            bits = tensors.uniform(summary["wbits"], summary["abits"])
        rows.append({"run": run.parent.name, "predicted_loss": problem.predicted(bits), "top1": summary["top1"],
                     "weight_bytes": summary.get("weight_bytes"), "bops": summary.get("bops")})  # fmt: skip
    return rows


def _ranks(rows: list[dict]) -> dict:
    """Rank agreement of lower predicted loss with higher top-1 (1: the same order)."""
    pred, top1 = [-r["predicted_loss"] for r in rows], [r["top1"] for r in rows]
    return {"n": len(rows), **_correlation(pred, top1)}


def _correlation(a: list[float], b: list[float]) -> dict:
    rho, tau = spearmanr(a, b).statistic, kendalltau(a, b).statistic
    return {"spearman": round(float(rho), 4), "kendall": round(float(tau), 4)}


def _costs(sweep: Path) -> list[dict]:
    out = []
    for run in sorted(sweep.glob("mixed-*/summary.json")):
        s = json.loads(run.read_text())
        out.append({"run": run.parent.name, "sensitivity_s": s["sensitivity_s"], "quantize_s": s["seconds"],
                    "ratio": round(s["sensitivity_s"] / s["seconds"], 4) if s["sensitivity_s"] else 0.0})  # fmt: skip
    return out


if __name__ == "__main__":
    main()
