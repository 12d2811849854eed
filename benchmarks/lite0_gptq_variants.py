"""GPTQ's settings on one fixed synthetic pool of EfficientNet-Lite0, W4A8 with 8-bit depthwise layers.

The pool is synthesized once (``--pool N --steps S``: N images, S synthesis steps per batch of 32, the BatchNorm
statistics matched in units of each BatchNorm's std, the decoder carried from batch to batch, seed 0) and kept in
``--cache``, so every variant fits the same images and only GPTQ's setting differs. Variants, ``NAME:KEY=VALUE,...``
with GPTQConfig keys, plus ``fc=8`` (the classifier's weights at 8 bits) and ``mirror=1`` (the Hessians over the pool
and its mirror images); ``base:`` is GPTQ's defaults. Deploy protocol, evaluated on the 872 photos that
``lite0_w4a8_bound.py`` holds out (full precision 88.53).

Usage: python benchmarks/lite0_gptq_variants.py [--pool 128] [--steps 60] [--cache FILE]
       [--variants base: fc8:fc=8 damp0.1:damp=0.1 mirror:mirror=1 natural:act_order=false]
Writes benchmarks/results/lite0_gptq_variants.json (``--results NAME``: NAME.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import lite0_photos, write_result

import dfq
from dfq.api import from_preprocessing
from dfq.evaluate import evaluate
from dfq.generators import synthesize_pool
from dfq.methods.gptq import GPTQConfig, gptq_quantize
from dfq.quant import LayerOverride
from dfq.utils.allocator import reuse_freed_memory

DEFAULT = ["base:", "fc8:fc=8", "damp0.1:damp=0.1", "mirror:mirror=1", "natural:act_order=false"]


def _variant(spec: str) -> tuple[str, dict, dict, bool]:
    """(name, GPTQConfig keys, layer overrides, mirror) of ``NAME:KEY=VALUE,...``."""
    name, _, items = spec.partition(":")
    keys, overrides, mirror = {}, {"*_depthwise_conv": LayerOverride(wbits=8)}, False
    for item in filter(None, items.split(",")):
        key, value = item.split("=")
        if key == "fc":
            overrides["_fc"] = LayerOverride(wbits=int(value))
        elif key == "mirror":
            mirror = bool(int(value))
        else:
            keys[key] = json.loads(value)
    return name, keys, overrides, mirror


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cache", type=Path, default=None, help="where the pool is kept (default: a temporary file)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT)
    parser.add_argument("--results", default="lite0_gptq_variants", help="name of the JSON in benchmarks/results/")
    args = parser.parse_args()
    reuse_freed_memory()
    torch.manual_seed(0)
    p, batches = lite0_photos(batch_size=100)
    info = p.dfq_info
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    held = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[128:]  # as lite0_w4a8_bound.py
    held_out = list(zip(images[held].split(100), labels[held].split(100), strict=True))
    cache = args.cache or Path(tempfile.mkdtemp()) / "pool.pt"
    start = time.perf_counter()
    if cache.is_file():
        pool = torch.load(cache)
    else:
        pool = synthesize_pool(p, info.input_size, args.pool, batch=32, steps=args.steps, normalized=True,
                               warm_decoder=True, generator=torch.Generator().manual_seed(0),
                               input_stats=info.input_stats(), progress=False)  # fmt: skip
        torch.save(pool, cache)
    made = {"images": args.pool, "synth_steps": args.steps, "seconds": round(time.perf_counter() - start, 1)}
    fp = evaluate(p, held_out, progress=False)["top1"]
    result = {"model": "efficientnet_lite0", "bits": "W4A8, depthwise W8", "protocol": "deploy", "pool": made,
              "eval_images": len(held), "fp_top1": fp, "rows": []}  # fmt: skip
    for spec in args.variants:
        name, keys, overrides, mirror = _variant(spec)
        quant = from_preprocessing(p, dfq.QuantConfig(wbits=4, abits=8, overrides=overrides, weight_scales="stored"))[0]
        start = time.perf_counter()
        images = torch.cat([pool, pool.flip(-1)]) if mirror else pool
        q = gptq_quantize(p, quant, GPTQConfig(synth_batch=32, **keys), images, progress=False)
        row = {"variant": name, "spec": spec, "seconds": round(time.perf_counter() - start, 1),
               "top1": evaluate(q.eval(), held_out, progress=False)["top1"]}  # fmt: skip
        result["rows"].append(row)
        print(row, flush=True)
        write_result(args.results, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
