"""Where EfficientNet-Lite0 loses its accuracy at 4-bit weights: which layers' 4-bit grids cost what.

ZeroQ-calibrated W4A8 under the deploy protocol (8 distilled images x 25 steps, as the W8A8 row of zoo_deploy),
round-to-nearest weights, no reconstruction, with some layers kept at 8-bit weights by name: none, the depthwise
convolutions, the first and last layers (``ends_bits=8``), or both. Top-1 of the PyTorch Q on the 1,000 ImageNet
photos, full precision beside it.

Usage: python benchmarks/lite0_w4_sensitivity.py
Writes benchmarks/results/lite0_w4_sensitivity.json.
"""

from __future__ import annotations

import sys
import time

from _common import lite0_photos, write_result

import dfq
from dfq.evaluate import evaluate

SETTINGS = {
    "all 4-bit": ({}, None),
    "depthwise 8-bit": ({"*_depthwise_conv": {"wbits": 8}}, None),
    "first and last 8-bit": ({}, 8),
    "depthwise, first and last 8-bit": ({"*_depthwise_conv": {"wbits": 8}}, 8),
}


def main() -> int:
    p, loader = lite0_photos(batch_size=50)
    rows = [{"setting": "full precision", "top1": evaluate(p, loader, progress=False)["top1"]}]
    method = dfq.methods.ZeroQConfig(num_samples=8, steps=25)
    for name, (overrides, ends) in SETTINGS.items():
        quant = dfq.QuantConfig(wbits=4, abits=8, protocol="deploy", overrides=overrides, ends_bits=ends)
        t = time.perf_counter()
        result = dfq.quantize(p, quant, method, seed=0, progress=False)
        rows.append({"setting": name, "seconds": round(time.perf_counter() - t, 1),
                     "top1": evaluate(result.model.eval(), loader, progress=False)["top1"]})  # fmt: skip
        print(rows[-1], flush=True)
    write_result("lite0_w4_sensitivity", {"model": "efficientnet_lite0", "quant": "W4A8 deploy, zeroq", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
