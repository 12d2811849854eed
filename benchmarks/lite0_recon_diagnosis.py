"""Where ``recon`` loses accuracy on EfficientNet-Lite0 under the deploy protocol, at W8A8.

One pool of 32 synthetic images (60 synthesis steps, seed 0) serves every row, and reconstruction runs 100 steps per
unit at batch 16, as the short Lite0 runs of ``lite0_protocol``. Three measurements:

- ``stages``: for each protocol, top-1 on the 1,000 ImageNet photos after calibrating the ranges on the pool
  (min/max), after the least-error grids, and after the reconstruction;
- ``variants``: deploy-protocol reconstruction without learned weight steps, and without learned activation steps;
- ``units``: deploy protocol, each unit's squared error to P on the pool (summed over channels, mean over images)
  before and after its reconstruction.

Usage: python benchmarks/lite0_recon_diagnosis.py [--parts stages variants units]
Writes benchmarks/results/lite0_recon_diagnosis.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import lite0_photos, write_result

import dfq
from dfq.api import from_preprocessing
from dfq.evaluate import evaluate
from dfq.generators import synthesize_pool
from dfq.methods.recon import ReconConfig, _run, init_grids, reconstruct, reconstruct_unit, units
from dfq.quant import calibrate, quant_disabled, quantize_model

SETTINGS = {"num_samples": 32, "synth_batch": 32, "synth_steps": 60, "iters": 100, "batch_size": 16}


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _quant(p: torch.nn.Module, protocol: str) -> dfq.QuantConfig:
    return from_preprocessing(p, dfq.QuantConfig(wbits=8, abits=8, protocol=protocol, weight_scales="stored"))[0]


def stages(p, pool, top1) -> list[dict]:
    rows = []
    for protocol in ("deploy", "paper"):
        q = quantize_model(p, _quant(p, protocol)).eval()
        with torch.no_grad():
            calibrate(q, pool.split(32))
        calibrated = top1(q)
        with torch.no_grad():
            init_grids(q, pool, 32)
        least_error = top1(q)
        start = time.perf_counter()
        r = reconstruct(p, _quant(p, protocol), ReconConfig(**SETTINGS), pool, generator=_seed(),
                        progress=False)  # fmt: skip
        rows.append({"protocol": protocol, "calibrated": calibrated, "least_error": least_error, "recon": top1(r),
                     "recon_s": round(time.perf_counter() - start)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def variants(p, pool, top1) -> list[dict]:
    rows = []
    for change in ({"lr_wstep": 0.0}, {"lr_astep": 0.0}):
        config = ReconConfig(**SETTINGS, **change)
        r = reconstruct(p, _quant(p, "deploy"), config, pool, generator=_seed(), progress=False)
        rows.append({"protocol": "deploy", "change": change, "recon": top1(r)})
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def _error(unit, x, y) -> float:
    return float((_run(unit, x, 2**62) - y).pow(2).sum(1).mean())


def unit_errors(p, pool) -> list[dict]:
    q = quantize_model(p, _quant(p, "deploy")).eval()
    for prm in q.parameters():
        prm.requires_grad_(False)
    init_grids(q, pool, 32)
    generator, rows = torch.Generator().manual_seed(0), []
    x_q = x_fp = pool
    for i, unit in enumerate(units(q)):
        with quant_disabled(q):
            y_fp = _run(unit, x_fp, 2**62)
        before = _error(unit, x_q, y_fp)
        with torch.enable_grad():
            reconstruct_unit(unit, x_q, x_fp, y_fp, ReconConfig(**SETTINGS), generator)
        x_fp, x_q = y_fp, _run(unit, x_q, 2**62)
        rows.append({"unit": i, "before": before, "after": float((x_q - y_fp).pow(2).sum(1).mean())})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["stages", "variants", "units"])
    args = parser.parse_args()
    torch.manual_seed(0)
    p, loader = lite0_photos(batch_size=50)
    info = p.dfq_info

    def top1(m: torch.nn.Module) -> float:
        return evaluate(m.eval(), loader, progress=False)["top1"]

    pool = synthesize_pool(p, info.input_size, 32, batch=32, steps=60, generator=_seed(),
                           input_stats=info.input_stats(), progress=False)  # fmt: skip
    result = {"model": "efficientnet_lite0", "bits": "W8A8", "fp_top1": top1(p), "settings": SETTINGS}
    if "stages" in args.parts:
        result["stages"] = stages(p, pool, top1)
    if "variants" in args.parts:
        result["variants"] = variants(p, pool, top1)
    if "units" in args.parts:
        result["units"] = unit_errors(p, pool)
    write_result("lite0_recon_diagnosis", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
