"""SynQ's plug-ins: hard-sample labels, Grad-CAM alignment and the low-pass filter, by hand and in a game's steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from plugin_helpers import hand_outputs, plugin
from torch import nn
from torch.testing import assert_close

from dfq.errors import DFQError
from dfq.generators import lowpass
from dfq.methods import Outputs
from dfq.methods.losses import kd_loss
from dfq.quant import ActMode, set_act_mode
from dfq.testing import tiny_config, tiny_game, tiny_trainer
from dfq.train.gradcam import CamProbe, cam_loss, grad_cam
from dfq.train.plugins import CamAlignment, HardLabels, easy_mask, masked_ce


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
