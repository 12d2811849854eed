"""Write the paper presets under configs/ from the official configurations of each method.

Sources: GDFQ's shipped configs (github.com/xushoukai/GDFQ), AdaSG's and AdaDFQ's hocon configs and their
per-bit comments (github.com/hfutqian/AdaSG, github.com/hfutqian/AdaDFQ), ZAQ's argparse defaults
(github.com/FLHonker/ZAQ-code). The YAML files are committed; this script documents where every value
comes from and regenerates them: ``python scripts/make_presets.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from dfq.methods.zaq import ZAQ, ZAQConfig
from dfq.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1] / "configs"

MODELS = {  # preset stem -> (model, dataset family)
    "cifar10_resnet20": ("resnet20_cifar10", "cifar"),
    "cifar100_resnet20": ("resnet20_cifar100", "cifar"),
    "imagenet_resnet18": ("resnet18", "imagenet"),
    "imagenet_resnet50": ("resnet50", "imagenet"),
    "imagenet_mobilenetv2": ("mobilenetv2", "imagenet"),
}
STEPS = [100, 200, 300]


def gdfq(stem: str, bits: int) -> dict:
    """GDFQ ships CIFAR-100 R20 and ImageNet R18 configs; the others reuse them."""
    if MODELS[stem][1] == "cifar":
        train = {"batch_size": 200, "q_lr": 1e-4, "warmup_epochs": 4}
    else:
        train = {"batch_size": 16, "q_lr": 1e-6, "warmup_epochs": 50}
    train.update(q_milestones=STEPS, g_milestones=STEPS)
    return {"train": train, "gdfq": {"temperature": 20.0, "kd_reduction": "mean", "bns_weight": 0.1}}


def _ada_imagenet(stem: str, bits: int) -> dict:
    if stem == "imagenet_resnet50":
        warmup = 100 if bits == 3 else 50
        return {"warmup_epochs": warmup, "q_lr": 1e-4, "q_milestones": [200, 300, 400], "g_milestones": [200, 300, 400]}
    return {"warmup_epochs": 50, "q_lr": 1e-5, "q_milestones": [350, 400], "g_milestones": [350, 400]}


def adasg(stem: str, bits: int) -> dict:
    """AdaSG: every shipped config is 3-bit; other bit-widths use the same values."""
    if MODELS[stem][1] == "cifar":
        train = {"batch_size": 16, "q_lr": 1e-4, "warmup_epochs": 4, "q_milestones": STEPS, "g_milestones": STEPS}
        temperature = 20.0
    else:
        train = {"batch_size": 16, **_ada_imagenet(stem, bits)}
        temperature = 5.0
    return {
        "train": train,
        "adasg": {
            "alpha_ds": 0.1,
            "alpha_as": 0.1,
            "lambda_l": 0.3,
            "lambda_u": 0.8,
            "beta": 1.0,
            "gamma": 1.0,
            "temperature": temperature,
        },
    }


def adadfq(stem: str, bits: int) -> dict:
    """AdaDFQ: the 3-bit configs plus the per-bit notes of the hocon comments."""
    cfg = adasg(stem, bits)
    train = cfg["train"]
    coeffs = {**cfg.pop("adasg"), "alpha_ds": 0.2, "alpha_as": 0.1, "lambda_l": 0.1}
    if stem == "imagenet_resnet18":
        coeffs["alpha_ds"] = 0.3 if bits == 5 else 0.2
        coeffs["lambda_l"] = 0.3 if bits in (4, 5) else 0.1
    elif stem == "imagenet_mobilenetv2":
        coeffs["alpha_ds"] = 0.3 if bits == 4 else 0.2
    elif stem == "imagenet_resnet50":
        coeffs["alpha_ds"] = 0.1 if bits == 4 else 0.2
        coeffs["lambda_l"] = 0.3 if bits in (4, 5) else 0.4
        milestones = {3: [150, 300, 400], 4: [200, 300, 400], 5: [350, 400]}[bits]
        train.update(q_milestones=milestones, g_milestones=milestones)
    return {"train": train, "adadfq": coeffs}


def zaq(stem: str, bits: int) -> dict:
    """ZAQ's argparse defaults; the official code has no ImageNet path, these presets are dfq's."""
    out: dict = {"zaq": {"alpha": 1.0, "beta": 0.1, "gamma_r": 0.1}}
    schedule, default = dataclasses.asdict(ZAQConfig().train), dataclasses.asdict(TrainConfig())
    out["train"] = {k: v for k, v in schedule.items() if v != default[k]}  # one source: ZAQConfig's defaults
    out["quant"] = ZAQ(ZAQConfig()).quant_defaults()
    if MODELS[stem][1] == "imagenet":
        out["train"]["batch_size"] = 32  # 256 images of 224x224 per step do not fit a single GPU comfortably
    if stem == "imagenet_mobilenetv2":
        out["zaq"]["feature_layers"] = ["features.3", "features.6", "features.13", "features.17"]
    return out


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True


METHODS = {"gdfq": gdfq, "adasg": adasg, "adadfq": adadfq, "zaq": zaq}


def preset(method: str, stem: str, bits: int) -> dict:
    body = METHODS[method](stem, bits)
    train = {"epochs": 400, "iters_per_epoch": 200, **body.pop("train")}
    quant = {"wbits": bits, "abits": bits, "protocol": "paper", **body.pop("quant", {})}  # published comparisons
    own = body.pop(method)
    return {"model": MODELS[stem][0], "quant": quant, "method": {"name": method, **own, "train": train}}


def main() -> None:
    for method in METHODS:
        for stem in MODELS:
            for bits in (3, 4, 5):
                path = ROOT / method / f"{stem}_w{bits}a{bits}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                header = f"# {method}, {MODELS[stem][0]}, W{bits}A{bits}: paper settings (scripts/make_presets.py)\n"
                path.write_text(header + yaml.dump(preset(method, stem, bits), Dumper=_NoAliases, sort_keys=False))


if __name__ == "__main__":
    main()
