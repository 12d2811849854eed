"""The post-training method ``recon``: units, initial grids, one unit, end to end, validation and the CLI."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from recon_nets import MODEL, SHAPE, Block, _gen, _stored, _tiny, _weight_layers
from torch import nn

import dfq
from dfq.cli import main
from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.generators import synthesize_pool
from dfq.methods.gptq import GPTQConfig, gptq_quantize
from dfq.methods.recon import ReconConfig, reconstruct, reconstruct_unit, units
from dfq.models import create_model
from dfq.quant import ActMode, ActQuantizer, QuantConfig, act_quantizers, calibrate, quant_disabled, quantize_model
from dfq.quant.clip import init_grids
from dfq.testing import ChainedSumsNet

TINY = ReconConfig(num_samples=16, synth_batch=16, synth_steps=3, iters=5, batch_size=8)
EXAMPLE = torch.zeros(1, *SHAPE)


# --------------------------------------------------------------------------- tiny models


class Merge(nn.Module):
    """A residual block with two inputs: its skip comes from further back than the previous block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)) + skip)


class LongSkipNet(nn.Module):
    """stem -> block -> merge(block output, stem output): not a chain of single-input blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Block(8, 8, 1)
        self.merge = Merge(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.merge(self.block(y), y)
        return self.fc(torch.flatten(self.pool(z), 1))


def _assert_on_stored_grid(model: nn.Module) -> None:
    """Every weight is stored exactly on its quantizer's stored grid (quantizing it changes nothing)."""
    layers = _weight_layers(model)
    assert layers
    for layer in layers:
        wq = layer.weight_quantizer
        assert wq.stored
        with torch.no_grad():
            assert torch.equal(wq(layer.weight), layer.weight)


# --------------------------------------------------------------------------- 1. units


def test_units_of_resnet20_chain_to_the_whole_model() -> None:
    """resnet20: stem, 9 blocks, head = 11 units; running them in turn is exactly Q."""
    torch.manual_seed(0)
    q = quantize_model(create_model(MODEL), _stored()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(12))
    calibrate(q, [x])
    chain = units(q)
    assert len(chain) == 11
    modules = {id(m) for m in q.modules()}
    assert all(id(layer) in modules for unit in chain for layer in _weight_layers(unit))  # shared, not copies
    assert sum(len(_weight_layers(u)) for u in chain) == len(_weight_layers(q))
    with torch.no_grad():
        y = x
        for unit in chain:
            y = unit(y)
        assert torch.equal(y, q(x))


def _cut(model: nn.Module) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """Q of ``model`` calibrated and cut into units; the units run in turn, and Q itself, on the same inputs."""
    torch.manual_seed(0)
    q = quantize_model(model.eval(), _stored())
    calibrate(q, [torch.randn(4, *SHAPE, generator=_gen(3))])
    chain = units(q)
    x = torch.randn(3, *SHAPE, generator=_gen(4))
    y = x
    for unit in chain:
        y = unit(y)
        assert isinstance(y, torch.Tensor)  # never a tuple between units
    return chain, y, q(x)


def test_units_of_a_skip_across_blocks_cut_where_one_tensor_is_live() -> None:
    """A skip from two blocks back is no chain of blocks; the dataflow cut keeps the skip inside one unit."""
    chain, y, expected = _cut(LongSkipNet())
    assert len(chain) == 3 and torch.equal(y, expected)  # stem, block + merge (the skip is live across it), head


class _Vgg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # fmt: skip
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Dense(nn.Module):
    """Two densely connected layers (DenseNet's concatenations) and a 1x1 transition."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(7, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(11, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, F.relu(self.b1(self.c1(x)))], 1)
        x = torch.cat([x, F.relu(self.b2(self.c2(x)))], 1)
        return self.fc(F.relu(self.b3(self.c3(x))).mean((2, 3)))


@pytest.mark.parametrize(("model", "expected"), [(_Vgg, 3), (_Dense, 4)])
def test_units_of_chains_and_concatenations_hold_one_weighted_layer_each(model: type, expected: int) -> None:
    """Without residual blocks the model is not one unit (as it used to be): one weighted layer per unit."""
    chain, y, reference = _cut(model())
    assert len(chain) == expected and torch.equal(y, reference)
    weighted = [sum(isinstance(m, nn.Conv2d | nn.Linear) for m in unit.modules()) for unit in chain]
    assert weighted == [1] * expected


def test_units_of_chained_residuals_are_the_blocks_with_their_sum_grids() -> None:
    """Under the deploy protocol each sum has its own grid, inside its block's unit: recon learns its step there."""
    chain, y, reference = _cut(ChainedSumsNet())
    assert len(chain) == 5 and torch.equal(y, reference)  # stem, three blocks, head
    sums = [[n for n, m in unit.named_modules() if isinstance(m, ActQuantizer) and n.endswith("add_out")]
            for unit in chain[1:4]]  # fmt: skip
    assert all(len(s) == 1 for s in sums), sums


# --------------------------------------------------------------------------- 2. initial grids


@pytest.mark.parametrize("protocol", ["paper", "deploy"])
def test_init_grids_only_lowers_the_quantization_error(protocol: str) -> None:
    """The clip search starts at the min/max range: activation errors on the pool and weight scales only shrink."""
    pool = torch.randn(16, *SHAPE, generator=_gen(13))
    q = quantize_model(_tiny(), _stored(protocol=protocol)).eval()
    plain = copy.deepcopy(q)
    calibrate(plain, [pool])
    init_grids(q, pool, batch_size=len(pool))
    assert all(aq.get_mode() is ActMode.FROZEN for _, aq in act_quantizers(q))

    shrunk = False
    for a, b in zip(_weight_layers(q), _weight_layers(plain), strict=True):
        assert bool((a.weight_quantizer.scale <= b.weight_quantizer.scale).all())
        shrunk |= bool((a.weight_quantizer.scale < b.weight_quantizer.scale).any())
    assert shrunk

    # Each activation range against its min/max calibration, on the inputs the clip search saw
    # (the clipped weights, the unclipped activation ranges).
    reference = copy.deepcopy(q)
    for (_, r), (_, p) in zip(act_quantizers(reference), act_quantizers(plain), strict=True):
        r.lo.copy_(p.lo)
        r.hi.copy_(p.hi)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [aq.register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0]))
             for n, aq in act_quantizers(reference)]  # fmt: skip
    with torch.no_grad():
        reference(pool)
    for h in hooks:
        h.remove()
    lowered = 0
    for (name, aq), (_, ref) in zip(act_quantizers(q), act_quantizers(reference), strict=True):
        x = inputs[name]
        with torch.no_grad():
            err, ref_err = float((aq(x) - x).pow(2).sum()), float((ref(x) - x).pow(2).sum())
        assert err <= ref_err, name
        lowered += err < ref_err
    assert lowered >= 3


# --------------------------------------------------------------------------- 3. one unit


def _first_block() -> tuple[nn.Module, torch.Tensor, nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A calibrated stored-grid Q of the tiny net, its pool, its first block and that block's (x_q, x_fp, y_fp)."""
    pool = torch.randn(16, *SHAPE, generator=_gen(14))
    q = quantize_model(_tiny(), _stored()).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    calibrate(q, [pool])
    stem, block, *_ = units(q)
    with torch.no_grad():
        x_q = stem(pool)
        with quant_disabled(q):
            x_fp = stem(pool)
            y_fp = block(x_fp)
    return q, pool, block, (x_q, x_fp, y_fp)


def test_reconstruct_unit_leaves_an_ordinary_quantized_unit() -> None:
    """After fitting a block: finite loss, weights on their (learned) grids, quantizers frozen, nothing transient."""
    q, pool, block, data = _first_block()
    before = {k: v.clone() for k, v in q.state_dict().items() if not k.startswith("layer.0.")}
    loss = reconstruct_unit(block, *data, TINY, _gen())
    assert np.isfinite(loss) and loss > 0

    _assert_on_stored_grid(q.layer[0])
    for _, aq in act_quantizers(q.layer[0]):
        assert aq.get_mode() is ActMode.FROZEN and aq.drop_prob == 0.0 and not aq.training
    assert not any(m.training for m in q.modules())
    assert not [n for n, _ in q.named_parameters() if n.endswith(("alpha", "step"))]
    for k, v in q.state_dict().items():  # the other units are untouched
        if k in before:
            assert torch.equal(v, before[k]), k
    with torch.no_grad():  # Q still runs, deterministically
        assert torch.equal(q(pool), q(pool))


@pytest.mark.parametrize("lr_bn", [0.0, 1e-2])
def test_reconstruct_unit_learns_batchnorm_only_when_asked(lr_bn: float) -> None:
    """recon.lr_bn > 0 fits the unit's BatchNorm scales and shifts too (not the output sites inside them, which
    the deploy protocol adds); 0 leaves them as P's."""
    _, _, block, data = _first_block()
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [p.clone() for m in bns for p in m.parameters(recurse=False)]
    reconstruct_unit(block, *data, ReconConfig(**{**TINY.__dict__, "lr_bn": lr_bn}), _gen())
    after = [p for m in bns for p in m.parameters(recurse=False)]
    assert bns and not any(p.requires_grad for p in after)
    moved = [not torch.equal(a, b) for a, b in zip(after, before, strict=True)]
    assert all(moved) if lr_bn else not any(moved)


# --------------------------------------------------------------------------- 4. end to end


def test_recon_end_to_end_on_a_tiny_residual_net() -> None:
    """dfq.quantize(method="recon"): stored grids, weights on them, summary names the method, seeded."""
    model = _tiny()
    before = copy.deepcopy(model.state_dict())
    result = dfq.quantize(model, QuantConfig(wbits=4, abits=4), TINY, example_inputs=EXAMPLE, progress=False)
    q, summary = result.model, result.summary
    assert summary["method"] == "recon" and (summary["wbits"], summary["abits"]) == (4, 4)
    _assert_on_stored_grid(q)
    assert all(aq.get_mode() is ActMode.FROZEN and aq.drop_prob == 0.0 for _, aq in act_quantizers(q))
    assert not q.training
    assert not [n for n, _ in q.named_parameters() if n.endswith(("alpha", "step"))]
    assert all(p.requires_grad for p in q.parameters())
    x = torch.randn(8, *SHAPE, generator=_gen(15))
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert not torch.equal(out, ref)  # really quantized
    for k, v in model.state_dict().items():  # P is not modified
        assert torch.equal(v, before[k]), k
    again = dfq.quantize(model, QuantConfig(wbits=4, abits=4), TINY, example_inputs=EXAMPLE, progress=False).model
    for (k, v), (_, w) in zip(q.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_recon_bns_normalized_reaches_the_synthesis() -> None:
    """``method.bns_normalized`` changes the pool (the same seed otherwise), and so Q."""
    kwargs = {"batch": 4, "steps": 3, "progress": False}
    plain = synthesize_pool(_tiny(), SHAPE, 4, generator=_gen(5), **kwargs)
    assert not torch.equal(plain, synthesize_pool(_tiny(), SHAPE, 4, generator=_gen(5), normalized=True, **kwargs))
    model, quant = _tiny(), QuantConfig(wbits=4, abits=4)
    qs = [dfq.quantize(model, quant, dataclasses.replace(TINY, bns_normalized=flag), example_inputs=EXAMPLE,
                       progress=False).model.state_dict() for flag in (False, True)]  # fmt: skip
    assert any(not torch.equal(qs[0][k], qs[1][k]) for k in qs[0])


def test_recon_warm_decoder_reaches_the_synthesis() -> None:
    """``method.warm_decoder`` changes Q when the pool takes more than one synthesis batch (the same seed)."""
    model, quant = _tiny(), QuantConfig(wbits=4, abits=4)
    config = dataclasses.replace(TINY, synth_batch=8)
    qs = [dfq.quantize(model, quant, dataclasses.replace(config, warm_decoder=flag), example_inputs=EXAMPLE,
                       progress=False).model.state_dict() for flag in (False, True)]  # fmt: skip
    assert any(not torch.equal(qs[0][k], qs[1][k]) for k in qs[0])


def test_recon_spilling_to_mapped_files_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pool-sized tensor in a memory-mapped file (spill_mb=0), Q is bitwise the one made in memory, and
    no file is left in TMPDIR."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, quant = _tiny(), QuantConfig(wbits=4, abits=4)
    spilled = dfq.quantize(model, quant, dataclasses.replace(TINY, spill_mb=0), example_inputs=EXAMPLE, progress=False)
    in_memory = dfq.quantize(model, quant, TINY, example_inputs=EXAMPLE, progress=False)
    for (k, v), (_, w) in zip(spilled.model.state_dict().items(), in_memory.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert not list(tmp_path.glob("dfq-*"))


def test_reconstruct_fits_p_on_the_images_q_sees_under_a_fixed_input_range() -> None:
    """Under the deploy protocol's fixed input grid, pixels outside the valid range are clipped for P's targets as
    Q's input quantizer clips them: a pool that overshoots the range gives the Q of the pool clipped to it."""
    quant = QuantConfig(wbits=4, abits=4, protocol="deploy", input_range=(-1.0, 1.0), weight_scales="stored")
    pool = 3 * torch.randn(16, *SHAPE, generator=_gen(4))
    assert float((pool.abs() > 1).float().mean()) > 0.5

    def fit(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return reconstruct(_tiny(), quant, TINY, images, generator=_gen(5), progress=False).state_dict()

    for (k, v), (_, w) in zip(fit(pool).items(), fit(pool.clamp(-1, 1)).items(), strict=True):
        assert torch.equal(v, w), k


def test_recon_deploy_protocol_keeps_weights_on_the_signed_grid() -> None:
    """Under the deploy protocol recon's learned weights stay on symmetric signed stored grids."""
    q = dfq.quantize(_tiny(), QuantConfig(wbits=4, abits=4, protocol="deploy"), TINY, example_inputs=EXAMPLE,
                     progress=False).model  # fmt: skip
    _assert_on_stored_grid(q)
    for layer in _weight_layers(q):
        wq = layer.weight_quantizer
        assert wq.code_range.tolist() == [-7, 7] and not bool(wq.zero_point.any())


def test_recon_defaults_to_stored_weight_scales() -> None:
    """The recon method's own default; other methods keep the papers' min/max weights."""
    assert resolve_config(None, {"method": "recon"}).quant.weight_scales == "stored"
    assert resolve_config(None, {"method": "zeroq"}).quant.weight_scales == "minmax"
    assert resolve_config({"method": "recon", "quant": {"wbits": 3}}).quant.weight_scales == "stored"


# --------------------------------------------------------------------------- 5. validation


@pytest.mark.parametrize(
    "bad",
    [{"num_samples": 0}, {"iters": 0}, {"synth_batch": 0}, {"batch_size": 0}, {"drop_prob": 1.5},
     {"drop_prob": -0.1}, {"lowpass": 2.0}, {"round_warmup": 1.0}, {"spill_mb": -1}],
)  # fmt: skip
def test_recon_config_rejects_bad_values(bad: dict) -> None:
    """Bad settings are config errors up front, not failures mid-run."""
    with pytest.raises(DFQError, match="recon"):
        ReconConfig(**bad)
    with pytest.raises(DFQError, match="recon"):
        resolve_config(None, {"method": "recon", **{f"method.{k}": v for k, v in bad.items()}})


def test_recon_refuses_minmax_weight_scales() -> None:
    """recon learns weight grids, so forcing the min/max quantizer is an error that names the setting."""
    with pytest.raises(DFQError, match="weight_scales"):
        dfq.quantize(_tiny(), QuantConfig(weight_scales="minmax"), TINY, example_inputs=EXAMPLE, progress=False)
    with pytest.raises(DFQError, match="weight_scales"):
        resolve_config({"method": {"name": "recon"}, "quant": {"weight_scales": "minmax"}})


# --------------------------------------------------------------------------- CLI


def _npz(path: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels=np.arange(n) % 10)
    return path


def _cli(*argv: str) -> tuple[int, dict | None]:
    """Run the CLI in-process; (exit code, the last stdout line as JSON when there is one)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    lines = out.getvalue().strip().splitlines()
    try:
        return rc, json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return rc, None


@pytest.fixture(scope="module")
def recon_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`dfq quantize --method recon` of a random resnet20, papers' and deploy protocols, with --data."""
    root = tmp_path_factory.mktemp("recon_cli")
    torch.manual_seed(0)
    weights = root / "random.pt"
    torch.save(create_model(MODEL).state_dict(), weights)
    data = _npz(root / "tiny.npz")
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"recon": {"synth_batch": 16, "synth_steps": 2, "iters": 2, "batch_size": 8}}))
    runs = {"data": data}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFQ_HOME", str(root / "dfq_home"))
        for protocol in ("paper", "deploy"):
            run_dir = root / protocol
            rc, summary = _cli(
                "quantize", MODEL, "--method", "recon", "--wbits", "4", "--abits", "4",
                "--set", "method.num_samples=16",
                "--weights", str(weights), "--config", str(preset), "--protocol", protocol, "--data", str(data),
                "--out", str(run_dir), "--json", "--no-progress",
            )  # fmt: skip
            runs[protocol] = (rc, summary, run_dir)
    return runs


@pytest.mark.parametrize("protocol", ["paper", "deploy"])
def test_cli_quantize_recon(recon_runs: dict, protocol: str) -> None:
    """--method recon runs; --set and a preset in the earlier flat layout reach the method section; stored scales."""
    rc, summary, run_dir = recon_runs[protocol]
    assert rc == 0
    assert summary["method"] == "recon" and (summary["wbits"], summary["abits"]) == (4, 4)
    assert summary["n"] == 8 and 0 <= summary["top1"] <= 100
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"]["name"] == "recon" and config["quant"]["protocol"] == protocol
    assert config["quant"]["weight_scales"] == "stored"
    assert config["method"]["num_samples"] == 16
    method = config["method"]
    assert (method["synth_steps"], method["iters"], method["batch_size"], method["synth_batch"]) == (2, 2, 8, 16)
    state = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert "layer2.0.conv1.weight_quantizer.scale" in state
    assert json.loads((run_dir / "summary.json").read_text())["top1"] == summary["top1"]


def test_cli_eval_reproduces_the_recon_summary(recon_runs: dict) -> None:
    """dfq eval on the run directory rebuilds Q from its checkpoint and gets the quantize summary's top-1."""
    rc, summary, run_dir = recon_runs["paper"]
    assert rc == 0
    rc, result = _cli("eval", str(run_dir), "--data", str(recon_runs["data"]), "--json", "--no-progress")
    assert rc == 0
    assert result["method"] == "recon"
    assert (result["top1"], result["top5"], result["n"]) == (summary["top1"], summary["top5"], summary["n"])


def test_cli_export_of_a_deploy_recon_run_predicts_as_pytorch(recon_runs: dict, tmp_path: Path) -> None:
    """recon's learned grids are ordinary stored grids: the ONNX export predicts as PyTorch on every image."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    rc, summary, run_dir = recon_runs["deploy"]
    assert rc == 0
    rc, result = _cli("eval", str(run_dir), "--data", str(recon_runs["data"]), "--json", "--no-progress")
    assert rc == 0 and result["top1"] == summary["top1"]
    out = tmp_path / "m.onnx"
    rc, result = _cli("export", str(run_dir), "--out", str(out), "--verify", "--limit", "32", "--json",
                      "--no-progress")  # fmt: skip
    assert rc == 0 and out.is_file()
    assert result["verify"]["top1_agreement"] == 1.0 and result["verify"]["images"] == 32
    # 8-bit residual grids: ONNX Runtime's QLinearConv requantizes in float32 and may round a near-tie code the
    # other way (docs/deployment.md), at most 1 LSB on a few outputs
    sites = result["verify"]["sites"]
    assert all(s["max_lsb"] <= 1.0 + 1e-3 and s["mismatch"] < 1e-3 for s in sites), [s for s in sites if s["mismatch"]]
    assert result["integer_ops"].get("QLinearConv", 0) >= 1


class _ChannelSplit(nn.Module):
    """ShuffleNet-V2's unit: split the channels, transform one half, concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = F.relu(self.b1(self.c1(x))).chunk(2, dim=1)
        return self.fc(torch.cat([a, F.relu(self.b2(self.c2(b)))], 1).mean((2, 3)))


def test_units_never_cut_at_a_tuple() -> None:
    """A chunk's result is a tuple read by indexing: no unit may end there (it crashed on shufflenet_v2)."""
    chain, y, expected = _cut(_ChannelSplit())
    assert len(chain) == 3 and torch.equal(y, expected)


@pytest.mark.parametrize("init", ["nearest", "gptq"])
def test_rounding_init_is_where_the_learned_rounding_starts(init: str) -> None:
    """With every learning rate at 0 the reconstruction keeps its start: round-to-nearest on the initial grids, or
    exactly the Q that ``gptq`` makes on the same pool and grids."""
    teacher, pool = _tiny().eval(), torch.randn(16, *SHAPE, generator=_gen(3))
    frozen = dataclasses.replace(TINY, iters=1, rounding_init=init, lr_round=0.0, lr_wstep=0.0, lr_astep=0.0)
    q = reconstruct(teacher, _stored(), frozen, pool, generator=_gen(), progress=False)
    if init == "gptq":
        ref = gptq_quantize(teacher, _stored(), GPTQConfig(synth_batch=TINY.synth_batch), pool, progress=False)
    else:
        ref = quantize_model(teacher, _stored()).eval()
        init_grids(ref, pool, TINY.synth_batch)
    floats, want = dict(teacher.named_modules()), dict(ref.named_modules())
    layers = _weight_layers(q)
    got = [(name, m) for name, m in q.named_modules() if m in layers]
    assert len(got) == 7
    moved = 0
    with torch.no_grad():
        for name, layer in got:
            wq = layer.weight_quantizer
            assert torch.equal(wq.scale, want[name].weight_quantizer.scale)
            assert torch.equal(layer.weight, want[name].weight_quantizer(want[name].weight))
            moved += int((layer.weight != wq(floats[name].weight)).sum())
    assert (moved > 0) == (init == "gptq")  # GPTQ moves some weights off their nearest grid point


def test_rounding_init_is_validated() -> None:
    with pytest.raises(DFQError, match=r"recon\.rounding_init must be one of nearest, gptq, got 'adaround'"):
        ReconConfig(rounding_init="adaround")
