"""How far MLPerf Tiny ResNet-8 W4A4 can go with ``gptq``: synthetic pools against real images.

``gptq`` with its output-error grid search (``grid_search``), with and without the activation search
(``act_search``), fits ResNet-8 at W4A4 (deploy protocol) on pools of three kinds, per seed:

- ``synthetic``: the method's own pool (256 images of 150 synthesis steps, ``gptq``'s defaults), what ``dfq quantize
  resnet8_mlperf_cifar10 --method gptq`` builds;
- ``real256``, ``real1024``: 256 or 1,024 real CIFAR-10 test images (JPEG-75) of the six animal classes, drawn by the
  seed, an oracle no data-free method has. The evaluation set holds the four vehicle classes, so no pool image is a
  compressed copy of an evaluated one.

Every row is evaluated on the 4-class lossless set (full precision 92.025). If the real images cannot bring the
drop to 1.0, a better synthetic pool cannot either: the rounding and the 4-bit grids are the limit.

Usage: python benchmarks/resnet8_w4a4_bound.py [--seeds 0 1 2 3] [--pools synthetic real256 real1024]
Writes benchmarks/results/resnet8_w4a4_bound.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import JPEG, LOSSLESS, SHARED_DATA, write_result

import dfq
from dfq.api import from_preprocessing
from dfq.data import open_dataset
from dfq.data.loader import make_loader
from dfq.evaluate import evaluate
from dfq.generators import synthesize_pool
from dfq.methods.gptq import GPTQConfig, gptq_quantize
from dfq.models import create_model
from dfq.utils.seed import seed_everything

WEIGHTS = SHARED_DATA / "resnet8-mlperf-tiny-54f3da95.pt"
VEHICLES = (0, 1, 8, 9)  # the classes of the 4-class evaluation set
FITS = {"grid": {"grid_search": True}, "grid+act": {"grid_search": True, "act_search": True}}


def _animals(info: object) -> torch.Tensor:
    """The JPEG-75 test images of the six classes the evaluation set does not hold, through P's preprocessing."""
    batches = list(make_loader(open_dataset(JPEG), info.mean, info.std, batch_size=1000))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return images[~torch.isin(labels, torch.tensor(VEHICLES))]


def _pool(kind: str, p: torch.nn.Module, stats: object, animals: torch.Tensor, seed: int) -> torch.Tensor:
    if kind == "synthetic":
        c = GPTQConfig()
        return synthesize_pool(
            p, p.dfq_info.input_size, c.num_samples, batch=c.synth_batch, steps=c.synth_steps, lr=c.synth_lr,
            warm_decoder=c.warm_decoder, generator=torch.Generator().manual_seed(seed), input_stats=stats,
            progress=False,
        )  # fmt: skip
    n = int(kind.removeprefix("real"))
    return animals[torch.randperm(len(animals), generator=torch.Generator().manual_seed(seed))[:n]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--pools", nargs="+", default=["synthetic", "real256", "real1024"])
    args = parser.parse_args()
    missing = [str(path) for path in (WEIGHTS, LOSSLESS, JPEG) if not path.is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    p = create_model("resnet8_mlperf_cifar10", weights=WEIGHTS).eval()
    info = p.dfq_info
    quant, stats = from_preprocessing(p, dfq.QuantConfig(wbits=4, abits=4, weight_scales="stored"))
    test = list(make_loader(open_dataset(LOSSLESS), info.mean, info.std))
    animals = _animals(info)
    result = {"model": "resnet8_mlperf_cifar10", "bits": "W4A4", "protocol": "deploy", "method": "gptq",
              "fp_top1": evaluate(p, test, progress=False)["top1"], "rows": []}  # fmt: skip
    for seed in args.seeds:
        for kind in args.pools:
            seed_everything(seed)
            pool = _pool(kind, p, stats, animals, seed)
            for fit, keys in FITS.items():
                start = time.perf_counter()
                q = gptq_quantize(p, quant, GPTQConfig(**keys), pool, progress=False).eval()
                row = {"pool": kind, "images": len(pool), "seed": seed, "fit": fit,
                       "fit_s": round(time.perf_counter() - start, 1),
                       "top1": evaluate(q, test, progress=False)["top1"]}  # fmt: skip
                result["rows"].append(row)
                print(row, flush=True)
                write_result("resnet8_w4a4_bound", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
