"""How far EfficientNet-Lite0 W4A8 ``recon`` is from its target, and whether data or 4-bit grids are the gap.

The same reconstruction (deploy protocol, W4A8, 400 steps per unit at batch 16, the CPU settings of the
``zoo_deploy`` Lite0 rows) runs on pools of 128 images:

- ``synthetic``: dfq's pool (60 synthesis steps, seed 0), as ``dfq quantize`` builds it: every BatchNorm's
  statistics matched in the layer's own units;
- ``synthetic_norm``: the same, with the statistics matched in units of each BatchNorm's running standard deviation
  (``recon``'s ``method.bns_normalized=true``);
- ``real``: 128 of the 1,000 ImageNet photos, an oracle no data-free method has: it bounds what a better pool could
  give at this reconstruction budget;
- ``real_dw8``: the same photos with the 16 depthwise convolutions at 8 bits (3.9% of the weights);
- ``synthetic_norm_dw8``: the ``synthetic_norm`` pool with the depthwise convolutions at 8 bits, what the docs
  recommend for a depthwise model without data;
- ``synthetic_warm``, ``synthetic_norm_warm_dw8``: ``synthetic`` and ``synthetic_norm_dw8`` with the synthesis decoder
  carried from batch to batch (``recon``'s ``method.warm_decoder``, its default since it was measured on the CIFAR
  ResNets).

``--fit gptq`` fits Q to P on the same pools with GPTQ (``dfq.methods.gptq``, one shot) instead of the
reconstruction, ``--fit gptq_grid`` with GPTQ's ``grid_search``; ``--fit recon_gptq`` reconstructs with the learned
rounding starting at GPTQ's (``recon``'s ``method.rounding_init=gptq``). The allocator is set up as the CLI sets it
(``dfq.utils.allocator``). Every row is evaluated on the other 872 photos (a seed-0 permutation picks the 128),
with full precision on the same 872 beside it.

Usage: python benchmarks/lite0_w4a8_bound.py [--rows synthetic synthetic_norm real real_dw8 synthetic_norm_dw8
       synthetic_warm synthetic_norm_warm_dw8] [--iters 400] [--seed 0] [--synthetic-pool 128]
       [--synth-steps 60] [--fit recon|recon_gptq|gptq|gptq_grid] [--results lite0_w4a8_bound]
Writes benchmarks/results/RESULTS.json, replacing the rows this run redoes (the rows of another ``--iters``,
``--seed``, ``--synthetic-pool`` or ``--synth-steps`` are not kept: give such a run its own ``--results``). The 128
real photos and the held-out 872 are the same at every seed and synthetic pool size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import RESULTS, lite0_photos, write_result

import dfq
from dfq.api import from_preprocessing
from dfq.evaluate import evaluate
from dfq.generators import synthesize_pool
from dfq.methods.gptq import GPTQConfig, gptq_quantize
from dfq.methods.recon import ReconConfig, reconstruct
from dfq.quant import LayerOverride
from dfq.utils.allocator import reuse_freed_memory

POOL = 128
SETTINGS = {"num_samples": POOL, "synth_batch": 32, "synth_steps": 60, "batch_size": 16}
DEPTHWISE = "*_depthwise_conv"


def _quant(p: torch.nn.Module, dw8: bool) -> dfq.QuantConfig:
    overrides = {DEPTHWISE: LayerOverride(wbits=8)} if dw8 else {}
    return from_preprocessing(p, dfq.QuantConfig(wbits=4, abits=8, overrides=overrides, weight_scales="stored"))[0]


def _previous_rows(name: str, budget: dict) -> list[dict]:
    """The rows of an earlier run at the same budget and seed, which this run keeps unless it redoes them."""
    old = RESULTS / f"{name}.json"
    previous = json.loads(old.read_text()) if old.is_file() else {}
    same = previous.get("iters") == budget["iters"] and previous.get("seed", 0) == budget["seed"]
    same = same and previous.get("settings", SETTINGS) == budget["settings"]
    same = same and previous.get("fit") == budget.get("fit")
    return previous.get("rows", []) if same else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["synthetic", "synthetic_norm", "real", "real_dw8"])
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesis and the reconstruction")
    parser.add_argument("--synthetic-pool", type=int, default=POOL, help="images of the synthetic pools")
    parser.add_argument("--synth-steps", type=int, default=SETTINGS["synth_steps"], help="steps per synthesis batch")
    fits = ["recon", "recon_gptq", "gptq", "gptq_grid"]
    parser.add_argument("--fit", choices=fits, default="recon", help="what fits Q to P on each pool")
    parser.add_argument("--results", default="lite0_w4a8_bound", help="name of the JSON file under benchmarks/results")
    args = parser.parse_args()
    allocator = reuse_freed_memory()
    torch.manual_seed(0)
    p, batches = lite0_photos(batch_size=100)
    info = p.dfq_info
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    real_pool, held = images[order[:POOL]], order[POOL:]
    held_out = list(zip(images[held].split(100), labels[held].split(100), strict=True))

    def top1(m: torch.nn.Module) -> float:
        return evaluate(m.eval(), held_out, progress=False)["top1"]

    settings = {**SETTINGS, "num_samples": args.synthetic_pool, "synth_steps": args.synth_steps}
    config = ReconConfig(**settings, iters=args.iters, rounding_init="gptq" if args.fit == "recon_gptq" else "nearest")
    gptq = args.fit.startswith("gptq")  # one-shot GPTQ instead of the reconstruction (``--iters`` does not apply)
    fit = {"fit": args.fit} if args.fit != "recon" else {}
    budget = {"settings": settings, "iters": args.iters, "seed": args.seed, **fit}
    result = {"model": "efficientnet_lite0", "bits": "W4A8", "protocol": "deploy", **budget,
              "eval_images": len(held), "fp_top1": top1(p), "rows": _previous_rows(args.results, budget)}  # fmt: skip
    print(result, flush=True)
    for row in args.rows:
        start = time.perf_counter()
        if row.startswith("synthetic"):
            pool = synthesize_pool(p, info.input_size, settings["num_samples"], batch=settings["synth_batch"],
                                   steps=settings["synth_steps"], normalized="_norm" in row,
                                   warm_decoder="_warm" in row,
                                   generator=torch.Generator().manual_seed(args.seed), input_stats=info.input_stats(),
                                   progress=False)  # fmt: skip
        else:
            pool = real_pool
        pooled = time.perf_counter()
        seeded = torch.Generator().manual_seed(args.seed)
        if gptq:
            fit = GPTQConfig(synth_batch=settings["synth_batch"], grid_search=args.fit == "gptq_grid")
            q = gptq_quantize(p, _quant(p, row.endswith("dw8")), fit, pool, progress=False)
        else:
            q = reconstruct(p, _quant(p, row.endswith("dw8")), config, pool, generator=seeded, progress=False)
        done = time.perf_counter()
        result["rows"] = [r for r in result["rows"] if r["pool"] != row]
        result["rows"].append({"pool": row, "top1": top1(q), "pool_s": round(pooled - start, 1),
                               "reconstruct_s": round(done - pooled, 1), "allocator_tuned": allocator})  # fmt: skip
        print(result["rows"][-1], flush=True)
        write_result(args.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
