"""The plug-ins of the generator-based engine (``plugins:``): SynQ's low-pass filter, hard-sample labels
and Grad-CAM alignment; learned activation/weight steps (LSQ) and learned rounding (AdaRound).

The math is checked against hand computations on tiny tensors; the engine wiring on the tiny
teacher of ``test_engine.py`` (every run here takes a fraction of a second).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dfq.engine import read_train_checkpoint
from dfq.methods.plugins import CamProbe, PluginConfig, cam_loss, easy_mask, grad_cam, masked_ce
from test_engine import INPUT, clone_state, make_config, make_engine, make_teacher, quiet_bar
from torch import nn
from torch.testing import assert_close

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.generators import lowpass
from dfq.methods import Outputs
from dfq.methods.losses import kd_loss
from dfq.quant import ActMode, act_quantizers, set_act_mode
from dfq.quant.functional import lsq_fake_quantize

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # GDFQ's KLDivLoss, on purpose

LEARNED_SUFFIXES = (".step", ".alpha")


def act_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(q.lo), float(q.hi)) for n, q in act_quantizers(model)}


def act_modes(model: nn.Module) -> set[ActMode]:
    return {q.get_mode() for _, q in act_quantizers(model)}


def learned_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(LEARNED_SUFFIXES)]


def states(engine) -> dict[str, torch.Tensor]:
    return {
        **{f"q.{k}": v for k, v in engine.student.state_dict().items()},
        **{f"g.{k}": v for k, v in engine.generator.state_dict().items()},
    }


def assert_same_states(a, b) -> None:
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def hand_outputs(engine, easy: list[bool], seed: int = 0) -> tuple[Outputs, torch.Tensor]:
    """A batch whose P logits make exactly the samples marked ``easy`` easy (p_P(y) ~ 1); the others have
    p_P(y) ~ 0. Returns the outputs and the expected mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(easy)
    y = torch.randint(10, (b,), generator=g)
    p_logits = torch.randn(b, 10, generator=g)
    for i, e in enumerate(easy):
        p_logits[i, y[i]] = 20.0 if e else -20.0
    q_logits = torch.randn(b, 10, generator=g).requires_grad_()
    x = torch.randn(b, *INPUT, generator=g)
    mask = torch.tensor([1.0 if e else 0.0 for e in easy])
    return Outputs(x, y, p_logits, q_logits), mask


# ============================================================== math: easy_mask, masked_ce
def test_easy_mask_by_hand():
    # p_P(y): sample 0: softmax([0, 0])[0] = 0.5 exactly (difficulty 0.5); sample 1: 4 equal logits: p = 0.25
    # exactly (difficulty 0.75); sample 2: p(y) = e^2 / (e^2 + 1) ~ 0.8808 (difficulty ~0.1192);
    # sample 3: p(y) ~ 0.1192 (difficulty ~0.8808).
    logits = torch.tensor(
        [
            [0.0, 0.0, -math.inf, -math.inf],
            [1.0, 1.0, 1.0, 1.0],
            [2.0, 0.0, -math.inf, -math.inf],
            [2.0, 0.0, -math.inf, -math.inf],
        ]
    )
    y = torch.tensor([0, 3, 0, 1])
    assert easy_mask(logits, y, 0.5).tolist() == [1.0, 0.0, 1.0, 0.0]  # 1 - p = 0.5 <= 0.5: on the boundary
    assert easy_mask(logits, y, 0.4999).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert easy_mask(logits, y, 0.75).tolist() == [1.0, 1.0, 1.0, 0.0]  # boundary again, exact
    assert easy_mask(logits, y, 0.3).tolist() == [0.0, 0.0, 1.0, 0.0]  # between 0.1192 and 0.5
    assert easy_mask(logits, y, 0.1).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert easy_mask(logits, y, 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert easy_mask(logits, y, 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]
    # dtype of the logits, and no graph to P
    p = logits.clone().requires_grad_()
    mask = easy_mask(p, y, 0.5)
    assert mask.dtype == torch.float32 and not mask.requires_grad


def test_masked_ce_by_hand():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 5, generator=g), torch.randint(5, (6,), generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    # cross-entropy by hand: -log softmax(logits)[y]
    per_sample = -(logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(dim=1))
    assert_close(masked_ce(logits, y, mask), (per_sample * mask).sum() / 6)  # averaged over the WHOLE batch
    assert_close(masked_ce(logits, y, mask), (F.cross_entropy(logits, y, reduction="none") * mask).mean())
    assert_close(masked_ce(logits, y, None), F.cross_entropy(logits, y))
    assert_close(masked_ce(logits, y, torch.ones(6)), F.cross_entropy(logits, y))
    assert masked_ce(logits, y, torch.zeros(6)).item() == 0.0


# ============================================================== math: Grad-CAM
def _gap_linear(c: int = 3, k: int = 4, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(c, k)


def _hand_cam(weight: torch.Tensor, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k W[y, k] / (H W) * A_k), flattened, unit L2 norm per sample."""
    b, _, h, w = feats.shape
    coef = weight[y] / (h * w)  # (B, C): d logit_y / d A_k[i, j] for a GAP + Linear head
    raw = F.relu((coef[:, :, None, None] * feats).sum(dim=1)).reshape(b, -1)
    return raw / raw.norm(dim=1, keepdim=True)


def test_grad_cam_of_a_gap_linear_head_by_hand():
    lin = _gap_linear()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(5, 3, 4, 4, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 1])
    logits = lin(feats.mean(dim=(2, 3)))
    cam = grad_cam(logits, feats, y, create_graph=False)
    assert cam.shape == (5, 16)
    expected = _hand_cam(lin.weight.detach(), feats.detach(), y)
    assert_close(cam, expected)
    assert_close(cam.norm(dim=1), torch.ones(5))
    # Without create_graph the map carries no graph to the head's weights.
    (cam * torch.randn(5, 16, generator=g)).sum().backward()
    assert lin.weight.grad is None


def test_grad_cam_with_create_graph_is_differentiable_in_the_head():
    lin = _gap_linear()
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 3, 2, 3, generator=g)  # not a leaf that needs grad: the graph goes through the head
    feats_in = feats.clone().requires_grad_()
    y = torch.tensor([2, 0, 3, 1])
    cam = grad_cam(lin(feats_in.mean(dim=(2, 3))), feats_in, y, create_graph=True)
    assert_close(cam, _hand_cam(lin.weight.detach(), feats, y))
    (cam * torch.randn(4, 6, generator=g)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # The same gradient by hand: differentiate the hand formula.
    w = lin.weight.detach().clone().requires_grad_()
    g2 = torch.Generator().manual_seed(3)
    torch.randn(4, 3, 2, 3, generator=g2)
    target = torch.randn(4, 6, generator=g2)
    (_hand_cam(w, feats, y) * target).sum().backward()
    assert_close(lin.weight.grad, w.grad)


def test_grad_cam_all_negative_map_is_zero_not_nan():
    lin = _gap_linear()
    with torch.no_grad():
        lin.weight.copy_(lin.weight.abs() + 0.1)  # positive weights on all-negative maps: ReLU kills everything
    feats = (-torch.rand(2, 3, 3, 3) - 0.1).requires_grad_()
    y = torch.tensor([0, 2])
    cam = grad_cam(lin(feats.mean(dim=(2, 3))), feats, y, create_graph=True)
    assert torch.equal(cam, torch.zeros(2, 9))
    cam.sum().backward()
    assert torch.isfinite(lin.weight.grad).all() and torch.isfinite(feats.grad).all()


def test_cam_loss_is_mse_without_gradient_to_p():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(3, 6, generator=g).requires_grad_()
    q = torch.randn(3, 6, generator=g).requires_grad_()
    loss = cam_loss(p, q)
    assert_close(loss, ((q - p) ** 2).mean())
    loss.backward()
    assert p.grad is None
    assert_close(q.grad, 2 * (q - p).detach() / 18)


# ============================================================== CamProbe
def _two_pool_net() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def no_pool_net() -> nn.Module:
    """conv, BN, ReLU, flatten, linear: no average pooling anywhere (BN for GDFQ's BNS loss)."""
    layers = [nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(4 * 8 * 8, 10))


def test_cam_probe_captures_the_input_of_the_last_average_pool():
    net = _two_pool_net()
    probe = CamProbe(net, leaf=False)
    assert probe.pool is net[5]
    seen = {}
    net[5].register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    x = torch.randn(2, 3, 8, 8)
    with probe.capture() as p:
        logits = net(x)
    assert p is probe
    assert torch.equal(probe.feats, seen["x"]) and probe.feats.shape == (2, 5, 4, 4)
    assert probe.feats.grad_fn is not None  # leaf=False: the real intermediate, in Q's graph
    feats = probe.feats
    # With the captured maps, Grad-CAM equals the hand formula for the GAP + Linear head.
    cam = grad_cam(logits, feats, torch.tensor([0, 2]), create_graph=False)
    assert_close(cam, _hand_cam(net[7].weight.detach(), feats.detach(), torch.tensor([0, 2])))
    # The hook is removed after capture.
    probe.feats = None
    net(x)
    assert probe.feats is None


def test_cam_probe_leaf_for_a_frozen_model():
    net = _two_pool_net()
    for p in net.parameters():
        p.requires_grad_(False)
    probe = CamProbe(net, leaf=True)
    with torch.enable_grad(), probe.capture():
        logits = net(torch.randn(2, 3, 8, 8))
    feats = probe.feats
    assert feats.is_leaf and feats.requires_grad
    assert logits.requires_grad  # the head is differentiated from the leaf on
    logits[:, 1].sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_cam_probe_needs_average_pooling():
    with pytest.raises(DFQError, match="average-pooling"):
        CamProbe(no_pool_net(), leaf=True)


def test_engine_with_cam_rejects_a_model_without_pooling():
    teacher = no_pool_net().eval()
    with pytest.raises(DFQError, match="average-pooling"):
        make_engine(make_config("gdfq", plugins__cam_weight=0.5), teacher=teacher)
    engine = make_engine(make_config("gdfq", plugins__cam_weight=0.0), teacher=teacher)  # off: no pooling needed
    assert engine._cams == ()


# ============================================================== configuration
@pytest.mark.parametrize(
    "kwargs",
    [
        {"lowpass": -0.01},
        {"lowpass": 1.01},
        {"lowpass": float("nan")},
        {"hard_tau": -0.1},
        {"hard_tau": 1.5},
        {"hard_tau": float("nan")},
        {"hard_ce_weight": -1.0},
        {"cam_weight": -0.5},
        {"cam_weight": float("nan")},
        {"lr_astep": -1e-5},
        {"lr_wstep": -1e-5},
        {"lr_round": -1e-3},
        {"round_weight": -0.1},
        {"beta": (20.0,)},
        {"beta": (20.0, 2.0, 1.0)},
        {"beta": (0.0, 2.0)},
        {"beta": (20.0, -2.0)},
    ],
)
def test_plugin_config_rejects_bad_values(kwargs):
    with pytest.raises(DFQError, match="plugins\\."):
        PluginConfig(**kwargs)


def test_plugin_config_accepts_the_bounds():
    pc = PluginConfig(lowpass=1.0, hard_tau=0.0, hard_ce_weight=0.0, cam_weight=0.0, beta=[3, 1])
    assert pc.beta == (3.0, 1.0)
    assert PluginConfig(lowpass=0.0, hard_tau=1.0).hard_tau == 1.0
    assert not PluginConfig().learns_quantizers and not PluginConfig().changes_student_input
    assert PluginConfig(lsq=True).learns_quantizers and PluginConfig(adaround=True).learns_quantizers
    assert PluginConfig(lowpass=0.3).changes_student_input and PluginConfig(cam_weight=0.1).changes_student_input
    assert not PluginConfig(hard_tau=0.5).changes_student_input


def test_plugin_config_rejects_nan_beta():
    with pytest.raises(DFQError):
        PluginConfig(beta=(20.0, float("nan")))


def test_resolve_config_validates_plugins():
    with pytest.raises(DFQError, match=r"plugins\.lowpass"):
        resolve_config(None, {"method": "gdfq", "plugins.lowpass": 2.0})
    with pytest.raises(DFQError, match=r"plugins\.hard_tau"):
        resolve_config(None, {"method": "gdfq", "plugins.hard_tau": 1.5})
    with pytest.raises(DFQError, match=r"plugins\.beta"):
        resolve_config(None, {"method": "gdfq", "plugins.beta": [1.0]})
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method": "gdfq", "plugins.bogus": 1})
    c = resolve_config(None, {"method": "gdfq", "plugins.lowpass": 0.4, "plugins.beta": [10, 1]})
    assert c.plugins == PluginConfig(lowpass=0.4, beta=(10.0, 1.0))


def test_resolve_config_rejects_a_non_mapping_plugins_section():
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method": "gdfq", "plugins": "lsq"})


def test_resolve_config_stores_weight_scales_for_learned_steps():
    assert resolve_config(None, {"method": "gdfq"}).quant.weight_scales == "minmax"
    for key in ("plugins.lsq", "plugins.adaround"):
        assert resolve_config(None, {"method": "gdfq", key: True}).quant.weight_scales == "stored"
        assert resolve_config({"plugins": {key.split(".")[1]: True}}, {"method": "gdfq"}).quant.weight_scales == (
            "stored"
        )
        with pytest.raises(DFQError, match="weight_scales: stored"):  # an explicit minmax grid is refused
            resolve_config(None, {"method": "gdfq", key: True, "quant.weight_scales": "minmax"})
        with pytest.raises(DFQError, match="weight_scales: stored"):
            resolve_config({"quant": {"weight_scales": "minmax"}}, {"method": "gdfq", key: True})
    assert resolve_config(None, {"method": "gdfq", "plugins.lowpass": 0.5}).quant.weight_scales == "minmax"


@pytest.mark.parametrize("plugin", ["plugins__hard_tau", "plugins__cam_weight"])
def test_label_plugins_need_a_conditional_generator(plugin):
    config = make_config("zaq", **{plugin: 0.5})
    with pytest.raises(DFQError, match="sampled labels"):
        make_engine(config)
    make_engine(make_config("zaq", plugins__lowpass=0.5))  # the filter needs no labels


# ============================================================== low-pass filter
def test_lowpass_disables_the_shared_forward():
    plain = make_engine(make_config("adadfq", train__warmup_epochs=0))
    filtered = make_engine(make_config("adadfq", train__warmup_epochs=0, plugins__lowpass=0.5))
    for engine in (plain, filtered):
        engine._iteration(False)  # one observation: the ranges are calibrated
        set_act_mode(engine.student, ActMode.FROZEN)
    assert plain._can_share_student_forward(True)
    assert not filtered._can_share_student_forward(True)


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
def test_q_and_p_see_the_low_passed_images(method, monkeypatch):
    cutoff = 0.3
    engine = make_engine(make_config(method, train__warmup_epochs=0, plugins__lowpass=cutoff))
    engine._iteration(False)
    set_act_mode(engine.student, ActMode.FROZEN)
    q_inputs, seen = [], {}
    student_forward, student_loss = engine._student_forward, engine.method.student_loss

    def recording_forward(x):
        q_inputs.append(x.detach().clone())
        return student_forward(x)

    def recording_loss(out):
        seen["out"] = out
        return student_loss(out)

    monkeypatch.setattr(engine, "_student_forward", recording_forward)
    monkeypatch.setattr(engine.method, "student_loss", recording_loss)
    batch, _ = engine._generator_step()
    q_inputs.clear()  # AdaDFQ's G step runs Q on the raw images
    engine._student_step(batch, True)
    expected = lowpass(batch.x.detach(), cutoff)
    assert len(q_inputs) == 1
    assert torch.equal(q_inputs[0], expected)
    assert not torch.equal(expected, batch.x.detach())
    out = seen["out"]
    assert torch.equal(out.x, expected)
    with torch.no_grad():
        assert_close(out.p_logits, engine.teacher(expected), rtol=0, atol=0)  # P's targets on filtered images


def test_lowpass_iteration_runs_the_g_step_on_raw_and_the_q_step_on_filtered_images(monkeypatch):
    cutoff = 0.5
    engine = make_engine(make_config("adadfq", train__warmup_epochs=0, plugins__lowpass=cutoff))
    engine._iteration(False)
    set_act_mode(engine.student, ActMode.FROZEN)
    q_inputs = []
    student_forward = engine._student_forward
    monkeypatch.setattr(engine, "_student_forward", lambda x: q_inputs.append(x.detach()) or student_forward(x))
    engine._iteration(True)
    assert len(q_inputs) == 2  # no shared forward
    assert torch.equal(q_inputs[1], lowpass(q_inputs[0], cutoff))


# ============================================================== hard-sample labels
def test_gdfq_hard_tau_masks_the_label_cross_entropy():
    engine = make_engine(make_config("gdfq", plugins__hard_tau=0.4))
    easy = [True, False, True, True, False, False, True, False]
    out, mask = hand_outputs(engine, easy)
    assert torch.equal(easy_mask(out.p_logits, out.y, 0.4), mask)
    losses = engine._student_losses(out)
    c = engine.config.gdfq
    kd = kd_loss(out.q_logits, out.p_logits, c.temperature, c.kd_reduction)
    ce = (F.cross_entropy(out.q_logits, out.y, reduction="none") * mask).mean()
    assert_close(losses["ce"], ce)
    assert_close(losses["kd"], kd)
    assert_close(losses["loss"], c.kd_weight * kd + c.ce_weight * ce)
    assert losses["easy_frac"].item() == 0.5
    assert "easy_ce" not in losses  # GDFQ's own cross-entropy is the masked one
    # Without the plug-in: the plain cross-entropy to every label.
    plain = make_engine(make_config("gdfq"))
    out2, _ = hand_outputs(plain, easy)
    losses2 = plain._student_losses(out2)
    assert_close(losses2["ce"], F.cross_entropy(out2.q_logits, out2.y))
    assert "easy_frac" not in losses2


def test_gdfq_hard_tau_in_a_student_step_from_a_generator_batch():
    engine = make_engine(make_config("gdfq", train__warmup_epochs=0, plugins__hard_tau=0.5))
    engine._run_epoch(0, quiet_bar())
    set_act_mode(engine.student, ActMode.FROZEN)
    batch, _ = engine._generator_step()
    difficulty = 1 - F.softmax(batch.p_logits.detach(), dim=1).gather(1, batch.y[:, None]).squeeze(1)
    tau = float(difficulty.sort().values[3])  # exactly four samples (ties aside) are easy
    engine.plugins.hard_tau = tau
    mask = (difficulty <= tau).float()
    assert 0 < mask.sum() < len(mask)
    with torch.no_grad():
        q_logits = engine.student(batch.x.detach())
    logs = engine._student_step(batch, train_q=False)
    assert_close(logs["ce"], (F.cross_entropy(q_logits, batch.y, reduction="none") * mask).mean())
    assert_close(logs["easy_frac"], mask.mean())
    logs = engine._iteration(True)
    assert {"q_ce", "q_easy_frac", "q_kd", "q_loss"} <= set(logs)


@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_adadfq_hard_tau_adds_a_masked_cross_entropy(method):
    engine = make_engine(make_config(method, plugins__hard_tau=0.3, plugins__hard_ce_weight=0.7))
    easy = [False, True, True, False, True, False]
    out, mask = hand_outputs(engine, easy, seed=7)
    method_loss = engine.method.student_loss(Outputs(out.x, out.y, out.p_logits, out.q_logits))["loss"]
    losses = engine._student_losses(out)
    easy_ce = 0.7 * (F.cross_entropy(out.q_logits, out.y, reduction="none") * mask).mean()
    assert_close(losses["easy_ce"], easy_ce)
    assert_close(losses["easy_frac"], torch.tensor(0.5))
    assert_close(losses["loss"], method_loss + easy_ce)
    # hard_ce_weight 0: the mask is reported, no extra term
    engine.plugins.hard_ce_weight = 0.0
    losses = engine._student_losses(Outputs(out.x, out.y, out.p_logits, out.q_logits))
    assert "easy_ce" not in losses and "easy_frac" in losses
    assert_close(losses["loss"], method_loss)


# ============================================================== Grad-CAM alignment
def _teacher_cam(engine, x, y):
    seen = {}

    def leaf(_module, args):
        seen["f"] = args[0].detach().requires_grad_()
        return (seen["f"],)

    handle = engine.teacher.pool.register_forward_pre_hook(leaf)
    try:
        with torch.enable_grad():
            logits = engine.teacher(x)
    finally:
        handle.remove()
    return logits.detach(), grad_cam(logits, seen["f"], y, create_graph=False)


def test_teacher_targets_with_cam():
    engine = make_engine(make_config("gdfq", train__warmup_epochs=0, plugins__cam_weight=0.5))
    batch = engine._fresh_student_batch()
    logits, p_cam, feats = engine._teacher_targets(batch.x, batch.y, cam=True)
    hand_logits, hand_cam = _teacher_cam(engine, batch.x, batch.y)
    assert torch.equal(logits, hand_logits) and not logits.requires_grad
    assert_close(p_cam, hand_cam)
    assert p_cam.shape == (8, 16)  # 16 = the 4x4 maps of layer2
    assert feats == []
    assert all(p.grad is None for p in engine.teacher.parameters())
    # cam=False (the Q step of a warm-up epoch): no maps
    logits2, p_cam2, _ = engine._teacher_targets(batch.x, batch.y, cam=False)
    assert p_cam2 is None and torch.equal(logits2, hand_logits)


def test_cam_term_in_the_student_losses_trains_q():
    weight = 0.5
    engine = make_engine(make_config("gdfq", train__warmup_epochs=0, plugins__cam_weight=weight))
    engine._iteration(False)
    set_act_mode(engine.student, ActMode.FROZEN)
    batch = engine._fresh_student_batch()
    p_logits, p_cam, _ = engine._teacher_targets(batch.x, batch.y, cam=True)
    with engine._cams[1].capture() as probe:
        q_logits, q_feats = engine._student_forward(batch.x)
    losses = engine._student_losses(Outputs(batch.x, batch.y, p_logits, q_logits, None, [], q_feats), p_cam)
    q_cam = grad_cam(q_logits, probe.feats, batch.y, create_graph=True)
    assert_close(losses["cam"], weight * F.mse_loss(q_cam, p_cam))
    assert_close(losses["loss"], losses["kd"] + losses["ce"] + losses["cam"])
    assert losses["cam"] > 0
    engine.student.zero_grad(set_to_none=True)
    losses["cam"].backward()
    grads = {n: p.grad for n, p in engine.student.named_parameters()}
    assert grads["fc.weight"] is not None and grads["fc.weight"].abs().sum() > 0  # the head, through the CAM weights
    assert grads["layer2.0.weight"] is not None and grads["layer2.0.weight"].abs().sum() > 0  # and the maps
    assert all(p.grad is None for p in engine.teacher.parameters())
    # Without gradients (evaluation-like Q step) there is no CAM term.
    with torch.no_grad(), engine._cams[1].capture():
        q_logits, q_feats = engine._student_forward(batch.x)
        losses = engine._student_losses(Outputs(batch.x, batch.y, p_logits, q_logits, None, [], q_feats), p_cam)
    assert "cam" not in losses


def test_cam_student_step_logs_the_cam_term():
    engine = make_engine(make_config("gdfq", train__warmup_epochs=1, plugins__cam_weight=0.5))
    engine._run_epoch(0, quiet_bar())  # warm-up: no CAM (Q does not train)
    set_act_mode(engine.student, ActMode.FROZEN)
    batch, _ = engine._generator_step()
    assert "cam" not in engine._student_step(batch, train_q=False)
    logs = engine._student_step(batch, train_q=True)
    assert "cam" in logs and math.isfinite(logs["cam"].item())


# ============================================================== LSQ
def test_lsq_fake_quantize_by_hand():
    s, zp, qmin, qmax, g = 0.5, 1.0, 0, 7, 0.25
    x_values = [-1.2, 0.26, 0.74, 1.9, 3.5]
    # x/s + zp = [-1.4, 1.52, 2.48, 4.8, 8.0] -> round [-1, 2, 2, 5, 8] -> clamp [0, 2, 2, 5, 7]
    expected_out = torch.tensor([-0.5, 0.5, 0.5, 2.0, 3.0])
    expected_dx = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    # LSQ: d out / d s = round(x/s) - x/s inside, qmin - zp / qmax - zp at the clamps; times grad_scale
    expected_ds = g * torch.tensor([qmin - zp, 2 - 1 - 0.52, 2 - 1 - 1.48, 5 - 1 - 3.8, qmax - zp])
    for divide in (False, True):
        x = torch.tensor(x_values, requires_grad=True)
        step = torch.full((5,), s, requires_grad=True)  # one step per element: the gradient per element
        out = lsq_fake_quantize(x, step, torch.tensor(zp), qmin, qmax, g, divide)
        ref = (torch.clamp(torch.round(x.detach() / s + zp), qmin, qmax) - zp) * s
        assert torch.equal(out.detach(), expected_out) and torch.equal(out.detach(), ref)
        out.sum().backward()
        assert torch.equal(x.grad, expected_dx)
        assert_close(step.grad, expected_ds)
    # A scalar step gets the sum.
    x = torch.tensor(x_values)
    step = torch.tensor(s, requires_grad=True)
    lsq_fake_quantize(x, step, torch.tensor(zp), qmin, qmax, g).sum().backward()
    assert_close(step.grad, expected_ds.sum())


def _lsq_engine(**overrides):
    return make_engine(make_config("gdfq", train__epochs=3, plugins__lsq=True, **overrides))


def test_lsq_plugin_learns_steps_then_freezes_them():
    engine = _lsq_engine()
    bar = quiet_bar()
    assert engine.config.quant.weight_scales == "stored"
    engine._run_epoch(0, bar)
    assert engine.qp_opt is None and act_modes(engine.student) == {ActMode.OBSERVE}
    ranges_before = act_ranges(engine.student)
    wqs = engine._weight_quantizers()
    assert len(wqs) == 4 and all(wq.stored for _, wq in wqs)
    minmax_scales = [wq.minmax_qparams(layer.weight)[0].clone() for layer, wq in wqs]
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert torch.equal(wq.scale, s)  # the stored grid starts as the min/max grid
    weights_before = [layer.weight.detach().clone() for layer, _ in wqs]
    observed_steps = [q.qparams()[0].clone() for _, q in act_quantizers(engine.student)]

    engine._run_epoch(1, bar)
    aqs = [q for _, q in act_quantizers(engine.student)]
    assert act_modes(engine.student) == {ActMode.LEARNED}
    assert engine.qp_opt is not None
    groups = engine.qp_opt.param_groups
    assert [g["lr"] for g in groups] == [engine.plugins.lr_astep, engine.plugins.lr_wstep]
    assert [id(p) for p in groups[0]["params"]] == [id(q.step) for q in aqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.step) for _, wq in wqs]
    assert all(wq.learns_step for _, wq in wqs)
    assert len(learned_keys(engine.student)) == len(aqs) + len(wqs)
    assert act_ranges(engine.student) == ranges_before  # the ranges wait for the end
    # The weights keep training through the rounding's straight-through gradient.
    assert any(not torch.equal(layer.weight, w) for (layer, _), w in zip(wqs, weights_before, strict=True))
    # The act steps moved away from the observed grid, and qparams (the deploy bias grid's source) follows them.
    assert all(torch.equal(q.step.detach().abs(), q.qparams()[0]) for q in aqs)
    assert any(not torch.equal(q.step.detach(), s) for q, s in zip(aqs, observed_steps, strict=True))

    engine._run_epoch(2, bar)
    engine._end_quantizer_learning()
    assert engine.qp_opt is None
    assert act_modes(engine.student) == {ActMode.FROZEN}
    assert all(not hasattr(q, "step") for q in aqs)
    assert learned_keys(engine.student) == []
    ranges_after = act_ranges(engine.student)
    assert ranges_after.keys() == ranges_before.keys()
    assert all(ranges_after[n] != ranges_before[n] for n in ranges_before)
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert wq.stored and not wq.learns_step and not hasattr(wq, "step")
        assert not torch.equal(wq.scale, s)
        assert (wq.scale > 0).all()
    engine._end_quantizer_learning()  # idempotent


def test_lsq_end_learning_keeps_the_learned_grid():
    """The frozen act range reproduces the learned step exactly (qparams gives the step back)."""
    engine = _lsq_engine()
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    engine._run_epoch(1, bar)
    aqs = [q for _, q in act_quantizers(engine.student)]
    learned = [(q.step.detach().abs().clone(), q._grid[0].clone()) for q in aqs]
    wsteps = [wq.step.detach().abs().clone() for _, wq in engine._weight_quantizers()]
    engine._end_quantizer_learning()
    for q, (step, zp) in zip(aqs, learned, strict=True):
        scale, zero_point, _, _ = q.qparams()
        assert_close(scale, step)
        assert torch.equal(zero_point, zp)
    for (_, wq), step in zip(engine._weight_quantizers(), wsteps, strict=True):
        assert torch.equal(wq.scale, step)


@pytest.mark.parametrize(("warmup", "observe"), [(2, 1), (1, 2)])
def test_learning_starts_after_warmup_and_observation(warmup, observe, monkeypatch):
    engine = _lsq_engine(train__warmup_epochs=warmup, train__observe_epochs=observe, train__iters_per_epoch=1)
    begun = []
    begin = engine._begin_quantizer_learning

    def recording_begin():
        begun.append((engine.state.epoch, engine.state.iteration))
        begin()

    monkeypatch.setattr(engine, "_begin_quantizer_learning", recording_begin)
    bar = quiet_bar()
    for epoch in range(2):
        engine._run_epoch(epoch, bar)
        assert engine.qp_opt is None and ActMode.LEARNED not in act_modes(engine.student)
    engine._run_epoch(2, bar)
    assert begun == [(2, 0)]
    assert engine.qp_opt is not None and act_modes(engine.student) == {ActMode.LEARNED}


def test_lsq_run_end_to_end_leaves_an_ordinary_model(tmp_path):
    engine = _lsq_engine()
    q, _ = engine.run()
    assert act_modes(q) == {ActMode.FROZEN}
    assert learned_keys(q) == []
    assert engine.qp_opt is None
    # The last checkpoint was written while learning: it holds the learned parameters and their optimizer.
    engine2 = _lsq_engine()
    engine2.run_dir = tmp_path
    engine2.run()
    ckpt = read_train_checkpoint(tmp_path)
    assert ckpt["qp_opt"] is not None
    assert any(k.endswith(".step") for k in ckpt["student"])
    assert_same_states(engine, engine2)


# ============================================================== AdaRound
def _ada_engine(method="gdfq", **overrides):
    return make_engine(make_config(method, train__epochs=3, plugins__adaround=True, **overrides))


def _quantized_weights(engine):
    return [layer.weight for layer, _ in engine._weight_quantizers()]


def test_adaround_learns_rounding_not_weights():
    engine = _ada_engine()
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    set_act_mode(engine.student, ActMode.FROZEN)
    engine._begin_quantizer_learning()  # what epoch 1 does first
    wqs = engine._weight_quantizers()
    groups = engine.qp_opt.param_groups
    assert [g["lr"] for g in groups] == [engine.plugins.lr_wstep, engine.plugins.lr_round]
    assert [id(p) for p in groups[0]["params"]] == [id(wq.step) for _, wq in wqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.alpha) for _, wq in wqs]
    assert act_modes(engine.student) == {ActMode.FROZEN}  # adaround alone: act steps stay observed
    weights = [w.detach().clone() for w in _quantized_weights(engine)]
    alphas = [wq.alpha.detach().clone() for _, wq in wqs]
    steps = [wq.step.detach().clone() for _, wq in wqs]
    logs = engine._iteration(True)
    assert "q_round" in logs
    engine._run_epoch(1, bar)
    for w, before in zip(_quantized_weights(engine), weights, strict=True):
        assert w.grad is None
        assert torch.equal(w, before)
    assert all(not torch.equal(wq.alpha, a) for (_, wq), a in zip(wqs, alphas, strict=True))
    assert any(not torch.equal(wq.step, s) for (_, wq), s in zip(wqs, steps, strict=True))


def test_adaround_rounding_loss_by_hand():
    engine = _ada_engine(plugins__beta=[20.0, 2.0], plugins__round_weight=0.3)
    engine._run_epoch(0, quiet_bar())
    set_act_mode(engine.student, ActMode.FROZEN)
    engine._begin_quantizer_learning()
    with torch.no_grad():  # rounding variables away from their start, so the regulariser is not trivial
        for _, wq in engine._weight_quantizers():
            wq.alpha.add_(torch.randn_like(wq.alpha))
    t = engine.train  # learning from epoch 1 to 3: iterations 3 to 9

    def hand(beta):
        total, count = torch.tensor(0.0), 0
        for _, wq in engine._weight_quantizers():
            h = torch.clamp(torch.sigmoid(wq.alpha.detach()) * 1.2 - 0.1, 0, 1)
            total = total + (1 - (2 * h - 1).abs() ** beta).sum()
            count += wq.alpha.numel()
        return total / count

    for epoch, iteration, beta in [(1, 0, 20.0), (2, 1, 8.0), (1, 2, 20.0 - 18.0 * 2 / 6), (3, 0, 2.0)]:
        engine.state.epoch, engine.state.iteration = epoch, iteration
        done = (epoch * t.iters_per_epoch + iteration - 3) / 6
        assert beta == pytest.approx(20.0 + (2.0 - 20.0) * done)
        assert_close(engine._rounding_loss(), hand(beta))
    engine.state.epoch, engine.state.iteration = 2, 1
    out, _ = hand_outputs(engine, [True] * 8)
    losses = engine._student_losses(out)
    assert_close(losses["round"], 0.3 * hand(8.0))
    method_loss = engine.method.student_loss(Outputs(out.x, out.y, out.p_logits, out.q_logits))["loss"]
    assert_close(losses["loss"], method_loss + losses["round"])
    # Before learning begins there is no rounding term.
    fresh = _ada_engine()
    out, _ = hand_outputs(fresh, [True] * 8)
    assert "round" not in fresh._student_losses(out)


def test_adaround_ends_on_the_stored_grid():
    engine = _ada_engine()
    bar = quiet_bar()
    for epoch in range(3):
        engine._run_epoch(epoch, bar)
    x = engine._fresh_student_batch().x
    for _, wq in engine._weight_quantizers():
        assert wq.soft_rounding  # learning uses the soft rounding ...
        wq.soft_rounding = False  # ... and Q ends with the hard one
    with torch.no_grad():
        before = engine.student(x)
    engine._end_quantizer_learning()
    assert learned_keys(engine.student) == []
    for layer, wq in engine._weight_quantizers():
        assert wq.alpha is None and not hasattr(wq, "step") and not hasattr(wq, "_base")
        codes = layer.weight.detach() / wq.scale
        assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        codes = codes.round() + wq.zero_point
        qmin, qmax = wq.code_range.tolist()
        assert codes.min() >= qmin and codes.max() <= qmax
        # the fake-quantized weight is the weight itself
        assert_close(wq(layer.weight.detach()), layer.weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        after = engine.student(x)
    assert_close(after, before, rtol=1e-4, atol=1e-4)  # the rounding fixed is the rounding Q used


def test_adaround_rounding_learns_from_the_task_loss():
    engine = _ada_engine(plugins__round_weight=0.0)
    engine._run_epoch(0, quiet_bar())
    set_act_mode(engine.student, ActMode.FROZEN)
    engine._begin_quantizer_learning()
    batch, _ = engine._generator_step()
    engine._student_step(batch, True)
    grads = [wq.alpha.grad for _, wq in engine._weight_quantizers()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_learned_quantizers_need_something_to_learn():
    """Refused with a clear error when the engine is built, not with an optimizer's ValueError mid-run."""
    with pytest.raises(DFQError, match="no quantized weights"):
        make_engine(make_config("gdfq", plugins__adaround=True, quant__wbits=32))
    with pytest.raises(DFQError, match="no quantized weights or activations"):
        make_engine(make_config("gdfq", plugins__lsq=True, quant__wbits=32, quant__abits=32))
    make_engine(make_config("gdfq", plugins__lsq=True, quant__wbits=32))  # activation steps alone are fine


# ============================================================== resume and rollback
PLUGIN_SETS = {
    "lsq": {"plugins__lsq": True},
    "adaround": {"plugins__adaround": True},
    "all": {
        "plugins__lsq": True,
        "plugins__adaround": True,
        "plugins__cam_weight": 0.5,
        "plugins__lowpass": 0.5,
        "plugins__hard_tau": 0.9,
    },
}


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
@pytest.mark.parametrize("plugins", list(PLUGIN_SETS))
def test_resume_after_an_epoch_of_learning_is_bit_identical(method, plugins, tmp_path):
    config = make_config(method, train__epochs=3, **PLUGIN_SETS[plugins])
    ref = make_engine(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = make_engine(config, run_dir=tmp_path / "run")
    stopped._run_epoch(0, quiet_bar())
    stopped._run_epoch(1, quiet_bar())  # the first learning epoch
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 0) and ckpt["qp_opt"] is not None

    resumed = make_engine(config, run_dir=tmp_path / "run", torch_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)
    assert learned_keys(resumed.student) == []
    assert torch.equal(resumed.samplers[0].get_state(), ref.samplers[0].get_state())


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
@pytest.mark.parametrize("plugins", ["adaround", "all"])
def test_resume_mid_epoch_while_learning_is_bit_identical(method, plugins, tmp_path):
    config = make_config(method, train__epochs=3, train__checkpoint_every_iters=4, **PLUGIN_SETS[plugins])
    ref = make_engine(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = make_engine(config, run_dir=tmp_path / "run")
    calls = {"n": 0}
    iteration = stopped._iteration

    def crashing(train_q):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 1, iteration 2: after the checkpoint at global iteration 4
            raise KeyboardInterrupt
        return iteration(train_q)

    stopped._iteration = crashing
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1) and ckpt["qp_opt"] is not None
    assert any(k.endswith(".alpha") for k in ckpt["student"])

    resumed = make_engine(config, run_dir=tmp_path / "run", torch_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)


def test_resume_rejects_a_checkpoint_of_another_plugin_config(tmp_path):
    make_engine(make_config("gdfq", plugins__lsq=True), run_dir=tmp_path).run()
    other = make_engine(make_config("gdfq", plugins__adaround=True), run_dir=tmp_path)
    with pytest.raises(DFQError, match="different configuration"):
        other.run(resume=True)


@pytest.mark.parametrize("plugins", ["lsq", "adaround", "all"])
def test_rollback_to_before_learning(plugins):
    config = make_config("gdfq", train__epochs=3, **PLUGIN_SETS[plugins])
    engine = make_engine(config)
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    snapshot = engine._last_good
    assert snapshot["qp_opt"] is None and snapshot["epoch"] == 1
    engine._run_epoch(1, bar)
    assert engine.qp_opt is not None and learned_keys(engine.student)
    engine._restore(snapshot)
    assert engine.qp_opt is None
    assert learned_keys(engine.student) == []
    assert not any(hasattr(q, "step") for _, q in act_quantizers(engine.student))
    state = engine.student.state_dict()
    assert state.keys() == snapshot["student"].keys()
    for k, v in snapshot["student"].items():
        assert torch.equal(state[k], v), k
    # Redoing the epoch from the snapshot gives what a run without the detour gives.
    engine._run_epoch(1, bar)
    engine._run_epoch(2, bar)
    engine._end_quantizer_learning()
    straight = make_engine(config)
    for epoch in range(3):
        straight._run_epoch(epoch, bar)
    straight._end_quantizer_learning()
    assert_same_states(engine, straight)


def test_rollback_to_a_checkpoint_taken_while_learning():
    engine = make_engine(make_config("gdfq", train__epochs=3, **PLUGIN_SETS["all"]))
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    engine._run_epoch(1, bar)
    snapshot = engine._last_good
    assert snapshot["qp_opt"] is not None
    student = clone_state(engine.student)
    engine._run_epoch(2, bar)
    engine._restore(snapshot)
    assert engine.qp_opt is not None
    state = engine.student.state_dict()
    assert state.keys() == student.keys()
    for k, v in student.items():
        assert torch.equal(state[k], v), k


def test_teacher_is_untouched_by_the_plugins():
    teacher = make_teacher()
    before = clone_state(teacher)
    make_engine(make_config("gdfq", **PLUGIN_SETS["all"]), teacher=teacher).run()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


# ============================================================== review fixes
@pytest.mark.parametrize("plugin", ["plugins__lsq", "plugins__adaround"])
def test_deploy_evaluation_while_learning_is_the_final_model(plugin):
    """Under the deploy protocol the bias grids follow the learned steps, so what is evaluated during learning
    is exactly the model the run ends with."""
    engine = make_engine(make_config("gdfq", train__epochs=3, quant__protocol="deploy", **{plugin: True}))
    bar = quiet_bar()
    for epoch in range(3):
        engine._run_epoch(epoch, bar)
    x = engine._fresh_student_batch().x
    seen = {}
    engine.evaluate = lambda model: seen.setdefault("logits", model(x).detach()) is not None and {"top1": 0.0}
    engine._evaluate()
    engine._end_quantizer_learning()
    engine.student.eval()
    with torch.no_grad():
        assert_close(engine.student(x), seen["logits"], rtol=0, atol=1e-5)


def test_rollback_lowers_the_learned_quantizer_learning_rates():
    engine = _lsq_engine()
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    engine._run_epoch(1, bar)
    base = [g["base_lr"] for g in engine.qp_opt.param_groups]
    engine.state.lr_scale = 0.25
    engine._run_epoch(2, bar)
    assert [g["lr"] for g in engine.qp_opt.param_groups] == [0.25 * b for b in base]


def test_restore_does_not_alias_the_snapshot_optimizer_state():
    engine = _lsq_engine()
    bar = quiet_bar()
    engine._run_epoch(0, bar)
    engine._run_epoch(1, bar)
    snapshot = engine._snapshot()
    frozen = {k: copy.deepcopy(snapshot[k]) for k in ("q_opt", "g_opt", "qp_opt")}
    engine._restore(snapshot)
    engine._iteration(True)
    for key, state in frozen.items():
        for pid, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    assert torch.equal(snapshot[key]["state"][pid][name], value), (key, name)


def test_plugins_are_refused_where_they_would_be_ignored():
    with pytest.raises(DFQError, match="generator-based methods"):
        resolve_config(None, {"method": "recon", "plugins.lowpass": 0.5})
    with pytest.raises(DFQError, match="start learning at epoch"):
        make_engine(make_config("gdfq", plugins__lsq=True, train__epochs=1))
