"""Do `recon`'s defaults transfer across depth and family? Where each CIFAR model loses its W4A4 accuracy.

For each model, `dfq.quantize` with the default `recon` at W4A4 under the deploy protocol (the CLI's defaults), then
the same run with one thing changed, so the rows say which part of Q the drop comes from:

- ``default``: every layer and every activation a layer reads at 4 bits, the inputs of additions at 8
  (``quant.output_bits``'s default);
- ``adds4``: the inputs of additions at 4 bits too (``quant.output_bits=4``, the former default);
- ``w8``: weights at 8 bits (activations still 4);
- ``a8``: activations at 8 bits (weights still 4);
- ``ends8``: the first and last layers with their activations at 8 bits (BRECQ's, QDrop's and Genie's exception);
- ``real-pool``: the synthetic pool replaced by the first 1,024 images of the JPEG-75 CIFAR-10 test set, a
  **diagnostic, not a method** (it bounds what better synthesis could buy; those photos include JPEG copies of the
  lossless set's images, so it is an upper bound);
- ``real-pool-w8``: the same real pool with weights at 8 bits (what is left when neither the pool nor the weights
  cost anything);
- ``label-ce``: the pool synthesized with P's cross-entropy to a label assigned to each image in turn added to the
  BatchNorm-statistics loss (``method.label_weight=1``), so that it is class-balanced;
- ``bns-norm``: the pool synthesized with the BatchNorm statistics matched in units of each BatchNorm's running
  standard deviation (``method.bns_normalized=true``);
- ``cifar-stats``: the synthetic images start at CIFAR-10's pixel statistics through the model's normalisation
  (the preprocessing record's ``pixel_mean``/``pixel_std``), where the record leaves them standardised
  (``resnet20a_cifar10`` is normalised with ImageNet's statistics; ResNet-8's record has CIFAR-10's already);
- ``synth500``: the pool synthesized with 500 Adam steps per batch instead of 150 (``method.synth_steps=500``), so
  its BatchNorm statistics match P's more closely;
- ``cold``: every synthesis batch starts from a new random decoder (``method.warm_decoder=false``, the
  former default) instead of the decoder the previous batch ended with.

Every row is the final model on the 4-class lossless set (no selection), with the model's full precision.

Usage: python benchmarks/recon_transfer.py [--models resnet8_mlperf_cifar10 ...] [--variants default w8 ...] [--seed 0]
[--results recon_transfer]
Writes benchmarks/results/RESULTS.json, replacing rows of the same model, variant, seed and ``output_bits``
(the bits of the additions' inputs, ``quant.output_bits``); a study at a later commit names its own file, so the rows
it compares were all measured with one version of the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from _common import JPEG, LOSSLESS, RESULTS, SHARED_DATA, WEIGHTS, command, top1_on, write_result

import dfq
from dfq.config import resolve_config
from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.methods.recon import reconstruct
from dfq.models import create_model
from dfq.models._registry import CIFAR10_MEAN, CIFAR10_STD
from dfq.utils.seed import seed_everything

MODELS = {
    "resnet8_mlperf_cifar10": SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt",
    "resnet20a_cifar10": WEIGHTS,
}
VARIANTS = {
    "default": {},
    "adds4": {"quant.output_bits": 4},
    "w8": {"quant.wbits": 8},
    "a8": {"quant.abits": 8},
    "ends8": {"quant.ends_bits": 8},
    "real-pool": {},
    "real-pool-w8": {"quant.wbits": 8},
    "label-ce": {"method.label_weight": 1.0},
    "bns-norm": {"method.bns_normalized": True},
    "cifar-stats": {},
    "synth500": {"method.synth_steps": 500},
    "cold": {"method.warm_decoder": False},
}
POOL = 1024
REAL_POOL = {"real-pool", "real-pool-w8"}  # the variants reconstructing from real images


def run_variant(model: str, name: str, seed: int) -> dict:
    p = create_model(model, pretrained=False, weights=MODELS[model])
    if name == "cifar-stats":
        p.dfq_info = dataclasses.replace(p.dfq_info, pixel_mean=CIFAR10_MEAN, pixel_std=CIFAR10_STD)
    config = resolve_config(None, {"method.name": "recon", "quant.wbits": 4, "quant.abits": 4, **VARIANTS[name]})
    start = time.perf_counter()
    if name in REAL_POOL:
        info = p.dfq_info
        pool = torch.cat([x for x, _ in make_loader(open_dataset(JPEG), info.mean, info.std, limit=POOL)])
        quant = dataclasses.replace(config.quant, input_range=info.input_range())
        seed_everything(seed)
        q = reconstruct(p, quant, config.method, pool, generator=torch.Generator().manual_seed(seed), progress=False)
    else:
        q = dfq.quantize(p, config.quant, config.method, seed=seed, progress=False).model
    seconds = round(time.perf_counter() - start, 1)
    return {"model": model, "variant": name, "seed": seed, "overrides": VARIANTS[name],
            "output_bits": config.quant.output_bits, "seconds": seconds, **top1_on(q, {"lossless": LOSSLESS}),
            "command": command()}  # fmt: skip


def _key(row: dict) -> tuple:
    return row["model"], row["variant"], row.get("seed", 0), row["output_bits"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="recon_transfer", help="name of the JSON file under benchmarks/results")
    args = parser.parse_args()
    missing = [str(path) for path in [LOSSLESS, JPEG, *(MODELS[m] for m in args.models)] if not path.is_file()]
    if missing:
        print(f"skipped: not found: {', '.join(missing)}", file=sys.stderr)
        return 0
    old = RESULTS / f"{args.results}.json"
    previous = json.loads(old.read_text()) if old.is_file() else {}
    rows, fp = previous.get("results", []), previous.get("fp_top1", {})
    for model in args.models:
        fp[model] = top1_on(create_model(model, pretrained=False, weights=MODELS[model]), {"lossless": LOSSLESS})
        for name in args.variants:
            row = run_variant(model, name, args.seed)
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            print(json.dumps(row), flush=True)
            path = write_result(args.results, {"fp_top1": fp, "results": rows, "note": previous.get("note", "")})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
