"""The preprocessing record: input range and statistics from a model's normalisation, and what runs do with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dfq
from dfq.checkpoint import load_quantized
from dfq.data.imagenet import resize_center_crop
from dfq.errors import DFQError
from dfq.generators import distill_inputs, to_input_space
from dfq.models import create_model, get_model_info
from dfq.quant import ActQuantizer, QuantConfig, QuantSpec, calibrate, quantize_model
from dfq.quant.learning import QuantizerLearning


def test_input_range_and_stats_follow_the_normalisation() -> None:
    r20 = get_model_info("resnet20a_cifar10")
    assert r20.input_range() == pytest.approx(((0 - 0.485) / 0.229, (1 - 0.406) / 0.225))
    assert r20.input_stats() is None  # normalised by its own statistics: synthesis stays standardised
    r8 = get_model_info("resnet8_mlperf_cifar10")
    assert r8.input_range() == pytest.approx((0.0, 255.0))
    mean, std = r8.input_stats()
    assert mean == pytest.approx([0.49139968 * 255, 0.48215827 * 255, 0.44653124 * 255])
    assert std == pytest.approx([0.24703233 * 255, 0.24348505 * 255, 0.26158768 * 255])
    lite = get_model_info("efficientnet_lite0")
    assert lite.input_range() == pytest.approx((-127 / 128, 1.0))  # x = (pixel - 127) / 128
    assert lite.preprocessing()["crop_fraction"] == 0.875


def test_to_input_space_maps_standardised_images_per_channel() -> None:
    z = torch.randn(2, 3, 4, 4)
    assert to_input_space(z, None) is z
    x = to_input_space(z, ((1.0, 2.0, 3.0), (10.0, 20.0, 30.0)))
    assert torch.equal(x[:, 1], z[:, 1] * 20.0 + 2.0)


def test_distilled_images_of_a_raw_pixel_model_lie_where_its_pixels_do() -> None:
    torch.manual_seed(0)
    p = create_model("resnet8_mlperf_cifar10")
    images = distill_inputs(p, (3, 32, 32), 4, steps=2, input_stats=p.dfq_info.input_stats(), progress=False,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert 100 < float(images.mean()) < 150 and float(images.std()) > 20  # without the record: mean ~0, std ~1


def test_fixed_range_is_kept_by_observation_and_learning() -> None:
    aq = ActQuantizer(QuantSpec(8, symmetric=True, deploy=True), fixed_range=(0.0, 255.0))
    aq(torch.full((4,), 1000.0))  # OBSERVE mode: a fixed range does not move
    assert (float(aq.lo), float(aq.hi)) == (0.0, 255.0) and aq.fixed
    assert QuantizerLearning([], [aq]).acts == []
    with pytest.raises(DFQError, match="low < high"):
        ActQuantizer(QuantSpec(8), fixed_range=(1.0, 1.0))


def test_raw_pixels_pass_the_deploy_input_quantizer_exactly() -> None:
    """With the record's range 0..255 the 8-bit input grid is unsigned with step ~1: every pixel value survives."""
    torch.manual_seed(0)
    p = create_model("resnet8_mlperf_cifar10")
    q = quantize_model(p, QuantConfig(protocol="deploy", wbits=8, abits=8, input_range=(0.0, 255.0)))
    site = q.stem.conv.input_quantizer
    calibrate(q, [torch.randn(2, 3, 32, 32)])  # synthetic-looking data would have set a range near 0
    pixels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(site(pixels), pixels * site.qparams()[0])
    assert torch.allclose(site(pixels), pixels, rtol=1e-4)


def test_bad_input_range_is_a_config_error() -> None:
    with pytest.raises(DFQError, match="input_range"):
        QuantConfig(protocol="deploy", input_range=(2.0, -1.0))
    cfg = dfq.config.resolve_config(overrides={"quant.protocol": "deploy", "quant.input_range": [0, 255]})
    assert cfg.quant.input_range == (0.0, 255.0)
    assert dfq.config.resolve_config(cfg.to_dict()).quant.input_range == (0.0, 255.0)  # saved and read back


def test_quantize_fills_the_range_from_the_record_and_the_run_keeps_it(tmp_path) -> None:
    torch.manual_seed(0)
    p = create_model("resnet8_mlperf_cifar10")
    tiny = dfq.methods.ZeroQConfig(steps=1, num_samples=2)
    result = dfq.quantize(p, QuantConfig(protocol="deploy", wbits=8, abits=8), tiny, progress=False)
    assert result.quant.input_range == (0.0, 255.0)
    paper = dfq.quantize(p, QuantConfig(protocol="paper", wbits=8, abits=8), tiny, progress=False)
    assert paper.quant.input_range is None  # the papers' protocol leaves the input in float
    config = dfq.config.resolve_config(overrides={"model": "resnet8_mlperf_cifar10", "method.name": "zeroq",
                                                  "method.steps": 1, "method.num_samples": 2,
                                                  "quant.protocol": "deploy"})  # fmt: skip
    weights = tmp_path / "w.pt"
    torch.save(p.state_dict(), weights)
    config = dfq.config.resolve_config({**config.to_dict(), "weights": str(weights)})
    dfq.run(config, tmp_path / "run", progress=False)
    q, saved = load_quantized(tmp_path / "run")
    assert saved.quant.input_range == (0.0, 255.0) and q.stem.conv.input_quantizer.fixed
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert payload["preprocessing"]["input_range"] == [0.0, 255.0]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_image_folders_are_cropped_as_the_record_says(interpolation: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = resize_center_crop(image, 224, crop_fraction=0.95, interpolation=interpolation)
    resized = image.resize((int(236 * 400 / 300), 236), getattr(Image, interpolation.upper()))
    left, top = round((resized.width - 224) / 2), round((236 - 224) / 2)
    assert np.array_equal(np.asarray(out), np.asarray(resized.crop((left, top, left + 224, top + 224))))
    with pytest.raises(DFQError, match="interpolation"):
        resize_center_crop(image, 224, interpolation="lanczos")


@pytest.mark.parametrize("synthesizer", ["pixels", "decoder"])
def test_public_synthesis_of_a_raw_pixel_model_lies_where_its_pixels_do(synthesizer: str) -> None:
    torch.manual_seed(0)
    images = dfq.synthesize(create_model("resnet8_mlperf_cifar10"), 4, synthesizer=synthesizer, steps=1,
                            progress=False)  # fmt: skip
    assert 100 < float(images.mean()) < 150  # standardised images would sit near 0
