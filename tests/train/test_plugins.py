"""The plug-ins of the games (``plugins:``): SynQ's low-pass filter, hard-sample labels and Grad-CAM alignment;
learned activation/weight steps (LSQ) and learned rounding (AdaRound).

The math is checked against hand computations on tiny tensors; the wiring through the public game, trainer
and hook objects on the tiny classifier of :mod:`dfq.testing` (every run here takes a fraction of a second).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.generators import lowpass
from dfq.methods import Outputs
from dfq.methods.losses import kd_loss
from dfq.quant import ActMode, act_quantizers, set_act_mode, weight_quantizers
from dfq.quant.functional import lsq_fake_quantize, round_ste
from dfq.quant.learning import LEARNED_SUFFIXES
from dfq.testing import INPUT_SIZE, tiny_classifier, tiny_config, tiny_game, tiny_trainer
from dfq.train import read_train_checkpoint
from dfq.train.gradcam import CamProbe, cam_loss, grad_cam
from dfq.train.plugins import CamAlignment, HardLabels, LearnedQuantizers, PluginConfig, easy_mask, masked_ce


def act_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    return {n: (float(q.lo), float(q.hi)) for n, q in act_quantizers(model)}


def act_modes(model: nn.Module) -> set[ActMode]:
    return {q.get_mode() for _, q in act_quantizers(model)}


def learned_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(LEARNED_SUFFIXES)]


def plugin(game, cls):
    """The game's plug-in of type ``cls``."""
    return next(p for p in game.plugins.items if isinstance(p, cls))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states(trainer) -> dict[str, torch.Tensor]:
    return {
        **{f"q.{k}": v for k, v in trainer.game.student.state_dict().items()},
        **{f"g.{k}": v for k, v in trainer.game.generator.state_dict().items()},
    }


def assert_same_states(a, b) -> None:
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def hand_outputs(easy: list[bool], seed: int = 0) -> tuple[Outputs, torch.Tensor]:
    """A batch whose P logits make exactly the samples marked ``easy`` easy (p_P(y) ~ 1); the others have
    p_P(y) ~ 0. Returns the outputs and the expected mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(easy)
    y = torch.randint(10, (b,), generator=g)
    p_logits = torch.randn(b, 10, generator=g)
    for i, e in enumerate(easy):
        p_logits[i, y[i]] = 20.0 if e else -20.0
    q_logits = torch.randn(b, 10, generator=g).requires_grad_()
    x = torch.randn(b, *INPUT_SIZE, generator=g)
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


def test_game_with_cam_rejects_a_model_without_pooling():
    with pytest.raises(DFQError, match="average-pooling"):
        tiny_game(tiny_config("gdfq", plugins__cam_weight=0.5), teacher=no_pool_net().eval())
    game = tiny_game(tiny_config("gdfq", plugins__cam_weight=0.0), teacher=no_pool_net().eval())  # off: not needed
    assert game.plugins.items == []


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
        resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 2.0})
    with pytest.raises(DFQError, match=r"plugins\.hard_tau"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.hard_tau": 1.5})
    with pytest.raises(DFQError, match=r"plugins\.beta"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.beta": [1.0]})
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins.bogus": 1})
    c = resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 0.4, "method.plugins.beta": [10, 1]})
    assert c.method.plugins == PluginConfig(lowpass=0.4, beta=(10.0, 1.0))


def test_resolve_config_rejects_a_non_mapping_plugins_section():
    with pytest.raises(DFQError, match="plugins"):
        resolve_config(None, {"method.name": "gdfq", "method.plugins": "lsq"})


def test_resolve_config_stores_weight_scales_for_learned_steps():
    assert resolve_config(None, {"method.name": "gdfq"}).quant.weight_scales == "minmax"
    for name in ("lsq", "adaround"):
        key = f"method.plugins.{name}"
        assert resolve_config(None, {"method.name": "gdfq", key: True}).quant.weight_scales == "stored"
        preset = {"method": {"name": "gdfq", "plugins": {name: True}}}
        assert resolve_config(preset).quant.weight_scales == "stored"
        with pytest.raises(DFQError, match="weight_scales: stored"):  # an explicit minmax grid is refused
            resolve_config(None, {"method.name": "gdfq", key: True, "quant.weight_scales": "minmax"})
        with pytest.raises(DFQError, match="weight_scales: stored"):
            resolve_config({"quant": {"weight_scales": "minmax"}}, {"method.name": "gdfq", key: True})
    assert resolve_config(None, {"method.name": "gdfq", "method.plugins.lowpass": 0.5}).quant.weight_scales == "minmax"


@pytest.mark.parametrize("name", ["plugins__hard_tau", "plugins__cam_weight"])
def test_label_plugins_need_a_conditional_generator(name):
    with pytest.raises(DFQError, match="sampled labels"):
        tiny_game(tiny_config("zaq", **{name: 0.5}))
    game = tiny_game(tiny_config("zaq", plugins__lowpass=0.5))  # the filter needs no labels
    assert [type(p).__name__ for p in game.plugins.items] == ["LowPass"]


# ============================================================== low-pass filter
def _frozen_game(method: str, **overrides):
    """A game whose ranges were observed once, then frozen (Q's steady state)."""
    game = tiny_game(tiny_config(method, train__warmup_epochs=0, **overrides))
    game.iteration(False)
    set_act_mode(game.student, ActMode.FROZEN)
    return game


def test_lowpass_disables_the_shared_forward():
    assert _frozen_game("adadfq").shares_forward(True)
    assert not _frozen_game("adadfq", plugins__lowpass=0.5).shares_forward(True)


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
def test_q_and_p_see_the_low_passed_images(method, monkeypatch):
    cutoff = 0.3
    game = _frozen_game(method, plugins__lowpass=cutoff)
    q_inputs, seen = [], {}
    student_forward, student_loss = game.student_forward, game.method.student_loss
    monkeypatch.setattr(game, "student_forward", lambda x: q_inputs.append(x.detach().clone()) or student_forward(x))
    monkeypatch.setattr(game.method, "student_loss", lambda out: seen.setdefault("out", out) and student_loss(out))
    batch, _ = game.generator_step()
    q_inputs.clear()  # AdaDFQ's G step runs Q on the raw images
    game.student_step(batch, True)
    expected = lowpass(batch.x.detach(), cutoff)
    assert len(q_inputs) == 1
    assert torch.equal(q_inputs[0], expected)
    assert not torch.equal(expected, batch.x.detach())
    out = seen["out"]
    assert torch.equal(out.x, expected)
    with torch.no_grad():
        assert_close(out.p_logits, game.teacher(expected), rtol=0, atol=0)  # P's targets on filtered images


def test_lowpass_iteration_runs_the_g_step_on_raw_and_the_q_step_on_filtered_images(monkeypatch):
    cutoff = 0.5
    game = _frozen_game("adadfq", plugins__lowpass=cutoff)
    q_inputs = []
    student_forward = game.student_forward
    monkeypatch.setattr(game, "student_forward", lambda x: q_inputs.append(x.detach()) or student_forward(x))
    game.iteration(True)
    assert len(q_inputs) == 2  # no shared forward
    assert torch.equal(q_inputs[1], lowpass(q_inputs[0], cutoff))


# ============================================================== hard-sample labels
EASY = [True, False, True, True, False, False, True, False]


def test_gdfq_hard_tau_masks_the_label_cross_entropy():
    game = tiny_game(tiny_config("gdfq", plugins__hard_tau=0.4))
    out, mask = hand_outputs(EASY)
    assert torch.equal(easy_mask(out.p_logits, out.y, 0.4), mask)
    losses = game.student_losses(out)
    c = game.method.config
    kd = kd_loss(out.q_logits, out.p_logits, c.temperature, c.kd_reduction)
    ce = (F.cross_entropy(out.q_logits, out.y, reduction="none") * mask).mean()
    assert_close(losses["ce"], ce)
    assert_close(losses["kd"], kd)
    assert_close(losses["loss"], c.kd_weight * kd + c.ce_weight * ce)
    assert losses["easy_frac"].item() == 0.5
    assert "easy_ce" not in losses  # GDFQ's own cross-entropy is the masked one
    # Without the plug-in: the plain cross-entropy to every label.
    out2, _ = hand_outputs(EASY)
    losses2 = tiny_game("gdfq").student_losses(out2)
    assert_close(losses2["ce"], F.cross_entropy(out2.q_logits, out2.y))
    assert "easy_frac" not in losses2


def test_gdfq_hard_tau_in_a_student_step_from_a_generator_batch():
    trainer = tiny_trainer(tiny_config("gdfq", train__warmup_epochs=0, train__batch_size=8, plugins__hard_tau=0.5))
    trainer.train_epoch()
    game = trainer.game
    set_act_mode(game.student, ActMode.FROZEN)
    batch, _ = game.generator_step()
    difficulty = 1 - F.softmax(batch.p_logits.detach(), dim=1).gather(1, batch.y[:, None]).squeeze(1)
    tau = float(difficulty.sort().values[3])  # exactly four samples (ties aside) are easy
    plugin(game, HardLabels).tau = tau
    mask = (difficulty <= tau).float()
    assert 0 < mask.sum() < len(mask)
    with torch.no_grad():
        q_logits = game.student(batch.x.detach())
    logs = game.student_step(batch, train_q=False)
    assert_close(logs["ce"], (F.cross_entropy(q_logits, batch.y, reduction="none") * mask).mean())
    assert_close(logs["easy_frac"], mask.mean())
    logs = game.iteration(True)
    assert {"q_ce", "q_easy_frac", "q_kd", "q_loss"} <= set(logs)


@pytest.mark.parametrize("method", ["adadfq", "adasg"])
def test_adadfq_hard_tau_adds_a_masked_cross_entropy(method):
    game = tiny_game(tiny_config(method, plugins__hard_tau=0.3, plugins__hard_ce_weight=0.7))
    out, mask = hand_outputs([False, True, True, False, True, False], seed=7)
    method_loss = game.method.student_loss(Outputs(out.x, out.y, out.p_logits, out.q_logits))["loss"]
    losses = game.student_losses(out)
    easy_ce = 0.7 * (F.cross_entropy(out.q_logits, out.y, reduction="none") * mask).mean()
    assert_close(losses["easy_ce"], easy_ce)
    assert_close(losses["easy_frac"], torch.tensor(0.5))
    assert_close(losses["loss"], method_loss + easy_ce)
    # hard_ce_weight 0: the mask is reported, no extra term
    plugin(game, HardLabels).ce_weight = 0.0
    losses = game.student_losses(Outputs(out.x, out.y, out.p_logits, out.q_logits))
    assert "easy_ce" not in losses and "easy_frac" in losses
    assert_close(losses["loss"], method_loss)


# ============================================================== Grad-CAM alignment
def _teacher_cam(game, x, y):
    seen = {}

    def leaf(_module, args):
        seen["f"] = args[0].detach().requires_grad_()
        return (seen["f"],)

    handle = game.teacher.pool.register_forward_pre_hook(leaf)
    try:
        with torch.enable_grad():
            logits = game.teacher(x)
    finally:
        handle.remove()
    return logits.detach(), grad_cam(logits, seen["f"], y, create_graph=False)


def _recording_cam(game, monkeypatch) -> list:
    """P's maps as each Q step's loss receives them (``None``: no maps), recorded in a list."""
    cam, seen = plugin(game, CamAlignment), []
    terms = cam.terms
    monkeypatch.setattr(cam, "terms", lambda out: seen.append((cam.p_cam, out)) or terms(out))
    return seen


def test_q_step_targets_with_cam(monkeypatch):
    game = tiny_game(tiny_config("gdfq", train__warmup_epochs=0, plugins__cam_weight=0.5))
    seen = _recording_cam(game, monkeypatch)
    batch = game.fresh_batch()
    game.student_step(batch, True)
    (p_cam, out), hand = seen[0], _teacher_cam(game, batch.x, batch.y)
    assert torch.equal(out.p_logits, hand[0]) and not out.p_logits.requires_grad
    assert_close(p_cam, hand[1])
    assert p_cam.shape == (4, 16)  # 16 = the 4x4 maps of layer2
    assert out.p_feats == []
    assert all(p.grad is None for p in game.teacher.parameters())
    # train_q=False (the Q step of a warm-up epoch): no maps
    game.student_step(batch, False)
    assert seen[1][0] is None and torch.equal(seen[1][1].p_logits, hand[0])


def test_cam_term_in_the_student_losses_trains_q():
    """The hooks in the order of a Q step: P's maps, Q's forward inside the probe, then Q's loss."""
    weight = 0.5
    game = _frozen_game("gdfq", plugins__cam_weight=weight)
    cam = plugin(game, CamAlignment)
    batch = game.fresh_batch()
    with torch.no_grad(), cam.teacher_scope(True):
        p_logits, _, _ = game.teacher_forward(batch.x, bns=False)
    cam.after_teacher(p_logits, batch.y)
    p_cam = cam.p_cam
    with cam.student_scope():
        q_logits, q_feats = game.student_forward(batch.x)
    losses = game.student_losses(Outputs(batch.x, batch.y, p_logits.detach(), q_logits, None, [], q_feats))
    q_cam = grad_cam(q_logits, cam.q_probe.feats, batch.y, create_graph=True)
    assert_close(losses["cam"], weight * F.mse_loss(q_cam, p_cam))
    assert_close(losses["loss"], losses["kd"] + losses["ce"] + losses["cam"])
    assert losses["cam"] > 0
    game.student.zero_grad(set_to_none=True)
    losses["cam"].backward()
    grads = {n: p.grad for n, p in game.student.named_parameters()}
    assert grads["fc.weight"] is not None and grads["fc.weight"].abs().sum() > 0  # the head, through the CAM weights
    assert grads["layer2.0.weight"] is not None and grads["layer2.0.weight"].abs().sum() > 0  # and the maps
    assert all(p.grad is None for p in game.teacher.parameters())
    # Without gradients (an evaluation-like Q step) there is no CAM term.
    cam.p_cam = p_cam
    with torch.no_grad(), cam.student_scope():
        q_logits, q_feats = game.student_forward(batch.x)
        losses = game.student_losses(Outputs(batch.x, batch.y, p_logits, q_logits, None, [], q_feats))
    assert "cam" not in losses and cam.p_cam is None  # the maps served their step


def test_cam_student_step_logs_the_cam_term():
    trainer = tiny_trainer(tiny_config("gdfq", plugins__cam_weight=0.5))
    trainer.train_epoch()  # warm-up: no CAM (Q does not train)
    game = trainer.game
    set_act_mode(game.student, ActMode.FROZEN)
    batch, _ = game.generator_step()
    assert "cam" not in game.student_step(batch, train_q=False)
    logs = game.student_step(batch, train_q=True)
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


def _lsq_reference(x, step, zp, qmin, qmax, g, divide, keep):
    """LSQ composed of autograd's own operations (the step's gradient scaled by the detach trick, the rounding's
    straight-through gradient, clamp's mask), QDrop as a select."""
    step = step * g + (step - step * g).detach()
    divided = x / step if divide else x * (1.0 / step)
    out = (torch.clamp(round_ste(divided + zp), qmin, qmax) - zp) * step
    return out if keep is None else torch.where(keep, x, out)


@pytest.mark.parametrize("divide", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_lsq_fake_quantize_matches_autograd_of_the_composed_operations(divide, per_channel, drop):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=gen) * 2).requires_grad_(True)
    step = (torch.rand(4, 1, 1, 1, generator=gen) * 0.3 + 0.2) if per_channel else torch.tensor(0.37)
    step.requires_grad_(True)
    zp, qmin, qmax, g = torch.tensor(3.0), 0, 15, 0.1
    keep = torch.rand(x.shape, generator=gen) < 0.5 if drop else None
    weights = torch.randn(x.shape, generator=gen)
    out = lsq_fake_quantize(x, step, zp, qmin, qmax, g, divide, keep)
    grads = torch.autograd.grad((out * weights).sum(), [x, step])
    x_ref, step_ref = x.detach().clone().requires_grad_(True), step.detach().clone().requires_grad_(True)
    ref = _lsq_reference(x_ref, step_ref, zp, qmin, qmax, g, divide, keep)
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x_ref, step_ref])
    assert_close(out, ref, rtol=0, atol=1e-6)  # equal up to the last bit of the step in the forward
    assert torch.equal(grads[0] != 0, grads_ref[0] != 0)  # the straight-through mask; QDrop's kept elements pass
    assert_close(grads[0], grads_ref[0], rtol=1e-6, atol=0)  # the reference multiplies by step and 1 / step
    assert_close(grads[1], grads_ref[1], rtol=1e-5, atol=1e-6)  # LSQ's step gradient, summed to the step's shape
    assert grads[1].shape == step.shape


def _lsq_trainer(**overrides):
    return tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, **overrides))


def test_lsq_plugin_learns_steps_then_freezes_them():
    trainer = _lsq_trainer()
    game = trainer.game
    learned, config = plugin(game, LearnedQuantizers), game.config.plugins
    trainer.train_epoch()
    assert learned.opt is None and act_modes(game.student) == {ActMode.OBSERVE}
    ranges_before = act_ranges(game.student)
    wqs = list(weight_quantizers(game.student))
    assert len(wqs) == 4 and all(wq.stored for _, wq in wqs)
    minmax_scales = [wq.minmax_qparams(layer.weight)[0].clone() for layer, wq in wqs]
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert torch.equal(wq.scale, s)  # the stored grid starts as the min/max grid
    weights_before = [layer.weight.detach().clone() for layer, _ in wqs]
    observed_steps = [q.qparams()[0].clone() for _, q in act_quantizers(game.student)]

    trainer.train_epoch()
    aqs = [q for _, q in act_quantizers(game.student)]
    assert act_modes(game.student) == {ActMode.LEARNED}
    assert learned.opt is not None and game.student_optimizers() == [game.q_opt, learned.opt]
    groups = learned.opt.param_groups
    assert [g["lr"] for g in groups] == [config.lr_astep, config.lr_wstep]
    assert [id(p) for p in groups[0]["params"]] == [id(q.step) for q in aqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.step) for _, wq in wqs]
    assert all(wq.learns_step for _, wq in wqs)
    assert len(learned_keys(game.student)) == len(aqs) + len(wqs)
    assert act_ranges(game.student) == ranges_before  # the ranges wait for the end
    # The weights keep training through the rounding's straight-through gradient.
    assert any(not torch.equal(layer.weight, w) for (layer, _), w in zip(wqs, weights_before, strict=True))
    # The act steps moved away from the observed grid, and qparams (the deploy bias grid's source) follows them.
    assert all(torch.equal(q.step.detach().abs(), q.qparams()[0]) for q in aqs)
    assert any(not torch.equal(q.step.detach(), s) for q, s in zip(aqs, observed_steps, strict=True))

    trainer.train_epoch()
    game.finish()
    assert learned.opt is None and game.student_optimizers() == [game.q_opt]
    assert act_modes(game.student) == {ActMode.FROZEN}
    assert all(not hasattr(q, "step") for q in aqs)
    assert learned_keys(game.student) == []
    ranges_after = act_ranges(game.student)
    assert ranges_after.keys() == ranges_before.keys()
    assert all(ranges_after[n] != ranges_before[n] for n in ranges_before)
    for (_, wq), s in zip(wqs, minmax_scales, strict=True):
        assert wq.stored and not wq.learns_step and not hasattr(wq, "step")
        assert not torch.equal(wq.scale, s)
        assert (wq.scale > 0).all()
    game.finish()  # idempotent
    assert learned_keys(game.student) == []


def test_lsq_end_learning_keeps_the_learned_grid():
    """The frozen act range reproduces the learned step exactly (qparams gives the step back)."""
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    game = trainer.game
    aqs = [q for _, q in act_quantizers(game.student)]
    learned = [tuple(t.clone() for t in q.qparams()[:2]) for q in aqs]  # the learned step, its zero point
    wqs = list(weight_quantizers(game.student))
    wsteps = [wq.step.detach().abs().clone() for _, wq in wqs]
    game.finish()
    for q, (step, zp) in zip(aqs, learned, strict=True):
        scale, zero_point, _, _ = q.qparams()
        assert_close(scale, step)
        assert torch.equal(zero_point, zp)
    for (_, wq), step in zip(wqs, wsteps, strict=True):
        assert torch.equal(wq.scale, step)


@pytest.mark.parametrize(("warmup", "observe"), [(2, 1), (1, 2)])
def test_learning_starts_after_warmup_and_observation(warmup, observe, monkeypatch):
    trainer = _lsq_trainer(train__warmup_epochs=warmup, train__observe_epochs=observe, train__iters_per_epoch=1)
    game = trainer.game
    learned, learning = plugin(game, LearnedQuantizers), []
    iteration = game.method.iteration

    def recording(g, train_q):
        learning.append((trainer.state.epoch, learned.opt is not None, act_modes(g.student) == {ActMode.LEARNED}))
        return iteration(g, train_q)

    monkeypatch.setattr(game.method, "iteration", recording)
    trainer.run()
    assert learning == [(0, False, False), (1, False, False), (2, True, True)]


def test_lsq_run_end_to_end_leaves_an_ordinary_model(tmp_path):
    trainer = _lsq_trainer()
    q, _ = trainer.run()
    assert act_modes(q) == {ActMode.FROZEN}
    assert learned_keys(q) == []
    assert plugin(trainer.game, LearnedQuantizers).opt is None
    # The last checkpoint was written while learning: it holds the learned parameters and their optimizer.
    saved = tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True), run_dir=tmp_path)
    saved.run()
    ckpt = read_train_checkpoint(tmp_path)
    assert ckpt["qp_opt"] is not None
    assert any(k.endswith(".step") for k in ckpt["student"])
    assert_same_states(trainer, saved)


# ============================================================== AdaRound
def _ada_trainer(method="gdfq", **overrides):
    return tiny_trainer(tiny_config(method, train__epochs=3, plugins__adaround=True, **overrides))


def _learning_trainer(**overrides):
    """An AdaRound trainer after epoch 0, its ranges frozen and the rounding just begun (what epoch 1 starts with)."""
    trainer = _ada_trainer(**overrides)
    trainer.train_epoch()
    set_act_mode(trainer.game.student, ActMode.FROZEN)
    plugin(trainer.game, LearnedQuantizers).begin_epoch(1, lr_scale=1.0)
    return trainer


def test_adaround_learns_rounding_not_weights():
    trainer = _learning_trainer()
    game = trainer.game
    learned, config = plugin(game, LearnedQuantizers), game.config.plugins
    wqs = list(weight_quantizers(game.student))
    groups = learned.opt.param_groups
    assert [g["lr"] for g in groups] == [config.lr_wstep, config.lr_round]
    assert [id(p) for p in groups[0]["params"]] == [id(wq.step) for _, wq in wqs]
    assert [id(p) for p in groups[1]["params"]] == [id(wq.alpha) for _, wq in wqs]
    assert act_modes(game.student) == {ActMode.FROZEN}  # adaround alone: act steps stay observed
    weights = [layer.weight.detach().clone() for layer, _ in wqs]
    alphas = [wq.alpha.detach().clone() for _, wq in wqs]
    steps = [wq.step.detach().clone() for _, wq in wqs]
    assert "q_round" in game.iteration(True)
    trainer.train_epoch()
    for (layer, _), before in zip(wqs, weights, strict=True):
        assert layer.weight.grad is None
        assert torch.equal(layer.weight, before)
    assert all(not torch.equal(wq.alpha, a) for (_, wq), a in zip(wqs, alphas, strict=True))
    assert any(not torch.equal(wq.step, s) for (_, wq), s in zip(wqs, steps, strict=True))


def test_adaround_rounding_loss_by_hand():
    trainer = _learning_trainer(train__iters_per_epoch=3, plugins__beta=[20.0, 2.0], plugins__round_weight=0.3)
    game = trainer.game
    learned = plugin(game, LearnedQuantizers)
    with torch.no_grad():  # rounding variables away from their start, so the regulariser is not trivial
        for _, wq in weight_quantizers(game.student):
            wq.alpha.add_(torch.randn_like(wq.alpha))

    def hand(beta):
        total, count = torch.tensor(0.0), 0
        for _, wq in weight_quantizers(game.student):
            h = torch.clamp(torch.sigmoid(wq.alpha.detach()) * 1.2 - 0.1, 0, 1)
            total = total + (1 - (2 * h - 1).abs() ** beta).sum()
            count += wq.alpha.numel()
        return total / count

    out, _ = hand_outputs([True] * 8)
    # Learning from epoch 1 to 3 of 3 iterations: global iterations 3 to 9, beta linear from 20 to 2.
    for epoch, iteration, beta in [(1, 0, 20.0), (2, 1, 8.0), (1, 2, 20.0 - 18.0 * 2 / 6), (3, 0, 2.0)]:
        trainer.state.epoch, trainer.state.iteration = epoch, iteration
        done = (epoch * 3 + iteration - 3) / 6
        assert beta == pytest.approx(20.0 + (2.0 - 20.0) * done)
        assert_close(learned.terms(out)["round"], 0.3 * hand(beta))
    trainer.state.epoch, trainer.state.iteration = 2, 1
    losses = game.student_losses(out)
    assert_close(losses["round"], 0.3 * hand(8.0))
    method_loss = game.method.student_loss(Outputs(out.x, out.y, out.p_logits, out.q_logits))["loss"]
    assert_close(losses["loss"], method_loss + losses["round"])
    # Before learning begins there is no rounding term.
    assert "round" not in _ada_trainer().game.student_losses(hand_outputs([True] * 8)[0])


def test_adaround_ends_on_the_stored_grid():
    trainer = _ada_trainer()
    for _ in range(3):
        trainer.train_epoch()
    game = trainer.game
    x = game.fresh_batch().x
    wqs = list(weight_quantizers(game.student))
    for _, wq in wqs:
        assert wq.soft_rounding  # learning uses the soft rounding ...
        wq.soft_rounding = False  # ... and Q ends with the hard one
    with torch.no_grad():
        before = game.student(x)
    game.finish()
    assert learned_keys(game.student) == []
    for layer, wq in wqs:
        assert wq.alpha is None and not hasattr(wq, "step") and not hasattr(wq, "_base")
        codes = layer.weight.detach() / wq.scale
        assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        codes = codes.round() + wq.zero_point
        qmin, qmax = wq.code_range.tolist()
        assert codes.min() >= qmin and codes.max() <= qmax
        # the fake-quantized weight is the weight itself
        assert_close(wq(layer.weight.detach()), layer.weight.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        after = game.student(x)
    assert_close(after, before, rtol=1e-4, atol=1e-4)  # the rounding fixed is the rounding Q used


def test_adaround_rounding_learns_from_the_task_loss():
    game = _learning_trainer(plugins__round_weight=0.0).game
    batch, _ = game.generator_step()
    game.student_step(batch, True)
    grads = [wq.alpha.grad for _, wq in weight_quantizers(game.student)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_learned_quantizers_need_something_to_learn():
    """Refused with a clear error when the game is built, not with an optimizer's ValueError mid-run."""
    with pytest.raises(DFQError, match="no quantized weights"):
        tiny_game(tiny_config("gdfq", train__epochs=3, plugins__adaround=True, quant__wbits=32))
    with pytest.raises(DFQError, match="no quantized weights or activations"):
        tiny_game(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, quant__wbits=32, quant__abits=32))
    tiny_game(tiny_config("gdfq", train__epochs=3, plugins__lsq=True, quant__wbits=32))  # act steps alone are fine


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
    config = tiny_config(method, train__epochs=3, **PLUGIN_SETS[plugins])
    ref = tiny_trainer(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = tiny_trainer(config, run_dir=tmp_path / "run")
    stopped.train_epoch()
    stopped.train_epoch()  # the first learning epoch
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 0) and ckpt["qp_opt"] is not None

    resumed = tiny_trainer(config, run_dir=tmp_path / "run", global_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)
    assert learned_keys(resumed.game.student) == []
    assert torch.equal(resumed.game.streams.state(), ref.game.streams.state())


@pytest.mark.parametrize("method", ["gdfq", "adadfq"])
@pytest.mark.parametrize("plugins", ["adaround", "all"])
def test_resume_mid_epoch_while_learning_is_bit_identical(method, plugins, tmp_path, monkeypatch):
    config = tiny_config(method, train__epochs=3, train__iters_per_epoch=3, train__checkpoint_every_iters=4,
                         **PLUGIN_SETS[plugins])  # fmt: skip
    ref = tiny_trainer(config, run_dir=tmp_path / "ref")
    ref.run()

    stopped = tiny_trainer(config, run_dir=tmp_path / "run")
    iteration, calls = stopped.game.method.iteration, []

    def crashing(game, train_q):
        calls.append(1)
        if len(calls) == 6:  # epoch 1, iteration 2: after the checkpoint at global iteration 4
            raise KeyboardInterrupt
        return iteration(game, train_q)

    monkeypatch.setattr(stopped.game.method, "iteration", crashing)
    with pytest.raises(KeyboardInterrupt):
        stopped.run()
    ckpt = read_train_checkpoint(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 1) and ckpt["qp_opt"] is not None
    assert any(k.endswith(".alpha") for k in ckpt["student"])

    resumed = tiny_trainer(config, run_dir=tmp_path / "run", global_seed=999)
    resumed.run(resume=True)
    assert_same_states(resumed, ref)


def test_resume_rejects_a_checkpoint_of_another_plugin_config(tmp_path):
    tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__lsq=True), run_dir=tmp_path).run()
    other = tiny_trainer(tiny_config("gdfq", train__epochs=3, plugins__adaround=True), run_dir=tmp_path)
    with pytest.raises(DFQError, match="different configuration"):
        other.run(resume=True)


@pytest.mark.parametrize("plugins", ["lsq", "adaround", "all"])
def test_rollback_to_before_learning(plugins):
    config = tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS[plugins])
    trainer = tiny_trainer(config)
    game = trainer.game
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    assert snapshot["qp_opt"] is None and snapshot["epoch"] == 1
    trainer.train_epoch()
    assert plugin(game, LearnedQuantizers).opt is not None and learned_keys(game.student)
    trainer.restore(snapshot)
    assert plugin(game, LearnedQuantizers).opt is None
    assert learned_keys(game.student) == []
    assert not any(hasattr(q, "step") for _, q in act_quantizers(game.student))
    state = game.student.state_dict()
    assert state.keys() == snapshot["student"].keys()
    for k, v in snapshot["student"].items():
        assert torch.equal(state[k], v), k
    # Redoing the epoch from the snapshot gives what a run without the detour gives.
    trainer.train_epoch()
    trainer.train_epoch()
    game.finish()
    straight = tiny_trainer(config)
    for _ in range(3):
        straight.train_epoch()
    straight.game.finish()
    assert_same_states(trainer, straight)


def test_rollback_to_a_checkpoint_taken_while_learning():
    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS["all"]))
    trainer.train_epoch()
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    assert snapshot["qp_opt"] is not None
    student = clone_state(trainer.game.student)
    trainer.train_epoch()
    trainer.restore(snapshot)
    assert plugin(trainer.game, LearnedQuantizers).opt is not None
    state = trainer.game.student.state_dict()
    assert state.keys() == student.keys()
    for k, v in student.items():
        assert torch.equal(state[k], v), k


def test_teacher_is_untouched_by_the_plugins():
    teacher = tiny_classifier()
    before = clone_state(teacher)
    tiny_trainer(tiny_config("gdfq", train__epochs=3, **PLUGIN_SETS["all"]), teacher=teacher).run()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


# ============================================================== review fixes
@pytest.mark.parametrize("name", ["plugins__lsq", "plugins__adaround"])
def test_deploy_evaluation_while_learning_is_the_final_model(name):
    """Under the deploy protocol the bias grids follow the learned steps, so what is evaluated during learning
    is exactly the model the run ends with."""
    trainer = tiny_trainer(tiny_config("gdfq", train__epochs=3, quant__protocol="deploy", **{name: True}))
    for _ in range(3):
        trainer.train_epoch()
    game = trainer.game
    x = game.fresh_batch().x
    with torch.no_grad(), game.evaluated() as q:
        evaluated = q(x)
    game.finish().eval()
    with torch.no_grad():
        assert_close(game.student(x), evaluated, rtol=0, atol=1e-5)


def test_rollback_lowers_the_learned_quantizer_learning_rates():
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    learned = plugin(trainer.game, LearnedQuantizers)
    base = [g["base_lr"] for g in learned.opt.param_groups]
    trainer.state.lr_scale = 0.25
    trainer.train_epoch()
    assert [g["lr"] for g in learned.opt.param_groups] == [0.25 * b for b in base]


def test_restore_does_not_alias_the_snapshot_optimizer_state():
    trainer = _lsq_trainer()
    trainer.train_epoch()
    trainer.train_epoch()
    snapshot = trainer.snapshot()
    frozen = {k: copy.deepcopy(snapshot[k]) for k in ("q_opt", "g_opt", "qp_opt")}
    trainer.restore(snapshot)
    trainer.game.iteration(True)
    for key, state in frozen.items():
        for pid, values in state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    assert torch.equal(snapshot[key]["state"][pid][name], value), (key, name)


def test_plugins_are_refused_where_they_would_be_ignored():
    with pytest.raises(DFQError, match="plugins"):  # recon has no plug-ins
        resolve_config(None, {"method.name": "recon", "method.plugins.lowpass": 0.5})
    with pytest.raises(DFQError, match="start learning at epoch"):
        tiny_game(tiny_config("gdfq", plugins__lsq=True, train__epochs=1))


def test_a_plugin_registered_from_outside_joins_q_s_step_after_the_builtin_ones(tmp_path):
    """PLUGINS is the one list the game builds its hooks from, in registration order."""
    from dfq.train.plugins import PLUGINS, Plugin

    class Probe(Plugin):
        def logged(self, out):
            return {"probe": torch.tensor(7.0)}

    assert list(PLUGINS) == ["lowpass", "hard_tau", "cam", "learned_quantizers"]
    PLUGINS.add("probe", lambda ctx: Probe())
    try:
        trainer = tiny_trainer("gdfq", run_dir=tmp_path)
        trainer.run()
        assert isinstance(trainer.game.plugins.items[-1], Probe)
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(r["q_probe"] == 7.0 for r in records) and len(records) == 2
    finally:
        del PLUGINS["probe"]
