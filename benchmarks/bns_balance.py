"""How evenly the BatchNorm-statistics (BNS) loss weighs a model's layers, on real images.

The BNS loss of ZeroQ and Genie compares each BatchNorm's batch mean and variance with its running statistics in
the layer's own units, so a layer whose values are large (a stem fed raw 0-255 pixels, a wide expansion layer)
can outweigh all the others, and synthesis then matches little else. For each model this prints and records every
layer's term on real images, plain and in units of the layer's running standard deviation
(``BNStatsLoss(normalized=True)``, ``recon``'s ``method.bns_normalized``), with the largest term's share of the sum.

Usage: python benchmarks/bns_balance.py   (forwards only: seconds)
Writes benchmarks/results/bns_balance.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import IMAGENET, LITE0, LOSSLESS, SHARED_DATA, WEIGHTS, write_result

from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.generators import BNStatsLoss
from dfq.models import create_model

MODELS = {  # name: (weights, real images, how many)
    "resnet8_mlperf_cifar10": (SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt", LOSSLESS, 128),
    "resnet20a_cifar10": (WEIGHTS, LOSSLESS, 128),
    "efficientnet_lite0": (LITE0, IMAGENET, 32),
}


def terms(name: str, weights: Path, data: Path, count: int) -> dict:
    p = create_model(name, pretrained=False, weights=weights).eval()
    info = p.dfq_info
    images = next(iter(make_loader(open_dataset(data), info.mean, info.std, batch_size=count)))[0]
    row: dict = {"images": len(images), "data": data.name}
    for normalized in (False, True):
        with torch.no_grad(), BNStatsLoss(p, normalized=normalized) as bns:
            p(images)
            per_layer = {k: float(v) for k, v in bns.per_layer().items()}
        values = sorted(per_layer.values())
        top = max(per_layer, key=per_layer.get)
        row["normalized" if normalized else "plain"] = {
            "largest_layer": top, "largest": per_layer[top], "largest_share": per_layer[top] / sum(values),
            "median": values[len(values) // 2], "layers": len(values), "per_layer": per_layer,
        }  # fmt: skip
    return row


def main() -> int:
    missing = [str(path) for spec in MODELS.values() for path in spec[:2] if not path.is_file()]
    if missing:
        print(f"skipped: not found: {', '.join(missing)}", file=sys.stderr)
        return 0
    rows = {}
    for name, spec in MODELS.items():
        rows[name] = terms(name, *spec)
        for kind in ("plain", "normalized"):
            r = rows[name][kind]
            print(f"{name} {kind}: largest {r['largest_layer']} {r['largest']:.4g} ({100 * r['largest_share']:.1f}% "
                  f"of the sum), median layer {r['median']:.3g}, {r['layers']} layers")  # fmt: skip
    print(f"wrote {write_result('bns_balance', {'models': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
