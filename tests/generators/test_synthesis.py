"""Image synthesis: the low-pass filter, swing convolution and synthesize_pool (spilling, label_weight)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from recon_nets import SHAPE, _gen, _tiny
from torch import nn

from dfq.errors import DFQError
from dfq.generators import lowpass, synthesize_pool
from dfq.generators.synthesis import LatentDecoder, _Swing
from dfq.methods.recon import ReconConfig

# --------------------------------------------------------------------------- 1. lowpass


def test_lowpass_is_identity_at_a_huge_cutoff() -> None:
    """A Gaussian mask of enormous width is 1 everywhere."""
    x = torch.randn(2, 3, 8, 8, generator=_gen(9))
    torch.testing.assert_close(lowpass(x, 1e6), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cutoff", [0.05, 0.25, 1.0])
def test_lowpass_keeps_a_constant_image(cutoff: float) -> None:
    """The zero frequency passes at any cutoff."""
    x = torch.full((1, 3, 8, 6), 0.7)
    torch.testing.assert_close(lowpass(x, cutoff), x, rtol=0, atol=1e-6)


def test_lowpass_removes_a_checkerboard() -> None:
    """The Nyquist-frequency checkerboard (what strided convolutions let synthesis exploit) is filtered out."""
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, 8, 8)
    kept = float(lowpass(board, 0.25).pow(2).sum() / board.pow(2).sum())
    assert kept < 0.1
    smooth = torch.linspace(-1, 1, 8)[None, :].expand(1, 3, 8, 8)
    assert float(lowpass(board + smooth, 0.25).sub(board + smooth).pow(2).sum()) > 0.9 * float(board.pow(2).sum())


# --------------------------------------------------------------------------- 2. swing convolution


def test_swing_hooks_only_strided_convolutions_and_removes_them() -> None:
    """Only convolutions with a stride > 1 get a pre-hook, and only inside the block."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=(1, 2)),
        nn.Linear(2, 2),
    )  # fmt: skip
    _, strided, half, _ = model
    swing = _Swing(model, _gen())
    assert swing.convs == [strided, half]
    with swing:
        assert [len(m._forward_pre_hooks) for m in model] == [0, 1, 1, 0]
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), _Swing(model, _gen()):
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_swing_shifts_by_at_most_one_pixel_with_reflect_padding() -> None:
    """The hooked input is the reflect-padded input cropped at a random offset in {0, 1, 2}^2, same shape."""
    conv = nn.Conv2d(3, 4, 3, stride=2)
    swing = _Swing(conv, _gen(10))
    x = torch.randn(2, 3, 7, 9, generator=_gen(11))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    seen = set()
    for _ in range(40):
        (shifted,) = swing._hook(conv, (x,))
        assert shifted.shape == x.shape
        offsets = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(shifted, padded[:, :, dy : dy + 7, dx : dx + 9])]  # fmt: skip
        assert len(offsets) == 1
        seen.add(offsets[0])
    assert len(seen) >= 4  # random, not a fixed shift
    with swing:
        assert conv(x).shape == (2, 4, 3, 4)


# --------------------------------------------------------------------------- 3. synthesis


def test_synthesize_returns_the_pool_and_leaves_the_teacher_alone() -> None:
    """num_samples images in batches (the last one partial); P's state, grads and hooks are untouched."""
    teacher = _tiny()
    teacher.fc.bias.requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    pool = synthesize_pool(teacher, SHAPE, 10, batch=4, steps=2, lowpass=0.5, generator=_gen(), progress=False)
    assert pool.shape == (10, *SHAPE) and not pool.requires_grad and bool(torch.isfinite(pool).all())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n for n, p in teacher.named_parameters() if not p.requires_grad} == {"fc.bias"}
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


def test_synthesized_pool_spills_above_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool over spill_bytes is backed by an unlinked mapped file; the same pool under it is ordinary memory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    kwargs = {"batch": 4, "steps": 2, "progress": False}
    small = synthesize_pool(_tiny(), SHAPE, 6, generator=_gen(3), spill_bytes=10**9, **kwargs)
    big = synthesize_pool(_tiny(), SHAPE, 6, generator=_gen(3), spill_bytes=0, **kwargs)
    assert small.untyped_storage().filename is None
    assert str(big.untyped_storage().filename).startswith(str(tmp_path))
    assert torch.equal(small, big) and not list(tmp_path.glob("dfq-*"))


def test_spilling_where_no_file_can_be_made_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMPDIR that cannot hold the activations is a DFQError naming the knobs, not an OSError."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(DFQError, match=r"TMPDIR.*spill_mb"):
        synthesize_pool(_tiny(), SHAPE, 4, batch=4, steps=1, progress=False, generator=_gen(3), spill_bytes=0)


def test_label_weight_pushes_each_image_toward_its_assigned_class() -> None:
    """With recon.label_weight, image i is pushed toward class i mod C (a class-balanced pool)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    teacher = nn.Sequential(*layers, nn.Linear(4, 3)).eval()
    assigned = {}
    for weight in (0.0, 5.0):
        pool = synthesize_pool(teacher, (3, 8, 8), 6, batch=6, steps=60, label_weight=weight, swing=False,
                               generator=torch.Generator().manual_seed(0), progress=False)  # fmt: skip
        with torch.no_grad():
            assigned[weight] = float(teacher(pool).softmax(1)[torch.arange(6), torch.arange(6) % 3].mean())
    assert assigned[5.0] > assigned[0.0] + 0.05
    with pytest.raises(DFQError, match="label_weight"):
        ReconConfig(label_weight=-1.0)


@pytest.mark.parametrize("warm", [False, True])
def test_warm_decoder_starts_each_batch_from_the_previous_decoder(warm: bool) -> None:
    """With ``warm_decoder`` the second batch is the first batch's decoder applied to the second batch's latents;
    without it, a decoder of its own. At learning rate 0 the decoders keep their initial weights, so both are
    rebuilt exactly from the same random streams."""
    torch.manual_seed(5)
    pool = synthesize_pool(_tiny(), SHAPE, 8, batch=4, steps=2, lr=0.0, swing=False, warm_decoder=warm,
                           generator=_gen(7), progress=False)  # fmt: skip
    torch.manual_seed(5)
    _tiny()  # the same draws from the global stream as above
    latents = _gen(7)
    first, second = LatentDecoder(4, SHAPE, generator=latents), LatentDecoder(4, SHAPE, generator=latents)
    with torch.no_grad():
        torch.testing.assert_close(pool[:4], first(), rtol=0, atol=0)
        second.net = first.net if warm else second.net
        torch.testing.assert_close(pool[4:], second(), rtol=0, atol=0)
