"""The methods' losses and generators against hand-computed references (the papers and their official code).

Every reference below is written independently of ``dfq.methods.losses``: plain Python
``math`` on nested lists, with explicit loops, following the papers' formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfq.config import resolve_config
from dfq.errors import DFQError
from dfq.generators import (
    CifarGenerator,
    ConditionalBatchNorm2d,
    ImageNetGenerator,
    UnconditionalGenerator,
    create_generator,
)
from dfq.methods import Outputs, create_method
from dfq.methods.adadfq import AdaDFQ, AdaDFQConfig, AdaSG, AdaSGConfig
from dfq.methods.gdfq import GDFQ, GDFQConfig
from dfq.methods.losses import (
    balance_gap,
    entropy,
    kd_loss,
    normalized_entropy,
    scrm,
    student_entropy_loss,
    unit_channels,
)
from dfq.methods.zaq import ZAQ, ZAQConfig

# Tiny logits, B = 2 samples x C = 3 classes.
STUDENT = [[1.0, -0.5, 2.0], [0.3, 0.8, -1.2]]
TEACHER = [[2.0, 0.0, -1.0], [-0.7, 1.5, 0.4]]
LABELS = [2, 0]


# ------------------------------------------------------------------ references
def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _entropy(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in _softmax(row))


def _ce(rows: list[list[float]], labels: list[int]) -> float:
    """Mean over rows of -log softmax(row)[label]."""
    return sum(-math.log(_softmax(r)[y]) for r, y in zip(rows, labels, strict=True)) / len(rows)


def _sub(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[x - y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def _add(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[x + y for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]


def _kl_sum(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """Σ_i Σ_c p·(log p − log q), p = softmax(teacher/T), q = softmax(student/T)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p = _softmax([v / t for v in t_row])
        q = _softmax([v / t for v in s_row])
        total += sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True))
    return total


def _h_norm(rows: list[list[float]]) -> list[float]:
    h = [_entropy(r) for r in rows]
    h_min = min(h)
    return [(v - h_min) / (math.log(len(rows[0])) - h_min) for v in h]


def _balance_gap(rows: list[list[float]], lam_l: float, lam_u: float) -> float:
    h = _h_norm(rows)
    return sum(max(lam_l - v, 0.0) for v in h) / len(h) + sum(max(v - lam_u, 0.0) for v in h) / len(h)


def _t(rows: list[list[float]], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def _relations_reference(fmap: torch.Tensor, gamma: float) -> tuple[list, list]:
    """ZAQ's relation maps (CVPR 2021, Eq. 5-6) with explicit loops: returns X_sp[b][c][n] and X_ch[b][c][n]."""
    b_size, c_size, h, w = fmap.shape
    n_size = h * w
    all_sp, all_ch = [], []
    for b in range(b_size):
        # X: C x N, positions in row-major (h, w) order.
        x = [[float(fmap[b, c, i // w, i % w]) for i in range(n_size)] for c in range(c_size)]
        # 1. L2-normalise along the channels at every position.
        for n in range(n_size):
            norm = math.sqrt(sum(x[c][n] ** 2 for c in range(c_size)))
            for c in range(c_size):
                x[c][n] /= norm
        # 2. Spatial relation: A_sp = row-softmax(XᵀX) (N x N); X_sp = γ·X·A_spᵀ + X.
        gram = [[sum(x[c][n] * x[c][m] for c in range(c_size)) for m in range(n_size)] for n in range(n_size)]
        a_sp = [_softmax(row) for row in gram]
        x_sp = [
            [gamma * sum(x[c][m] * a_sp[n][m] for m in range(n_size)) + x[c][n] for n in range(n_size)]
            for c in range(c_size)
        ]
        # 3. Channel relation: E = XXᵀ; E′ = rowmax(E) − E; A_ch = row-softmax(E′); X_ch = γ·A_ch·X + X.
        e = [[sum(x[c][n] * x[d][n] for n in range(n_size)) for d in range(c_size)] for c in range(c_size)]
        e_prime = [[max(row) - v for v in row] for row in e]
        a_ch = [_softmax(row) for row in e_prime]
        x_ch = [
            [gamma * sum(a_ch[c][d] * x[d][n] for d in range(c_size)) + x[c][n] for n in range(n_size)]
            for c in range(c_size)
        ]
        all_sp.append(x_sp)
        all_ch.append(x_ch)
    return all_sp, all_ch


def _scrm_reference(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.1) -> float:
    s_sp, s_ch = _relations_reference(student, gamma)
    t_sp, t_ch = _relations_reference(teacher, gamma)

    def mean_abs_diff(a: list, b: list) -> float:
        diffs = [
            abs(u - v)
            for ba, bb in zip(a, b, strict=True)
            for ca, cb in zip(ba, bb, strict=True)
            for u, v in zip(ca, cb, strict=True)
        ]
        return sum(diffs) / len(diffs)

    return mean_abs_diff(s_sp, t_sp) + mean_abs_diff(s_ch, t_ch)


def _close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ------------------------------------------------------------------ KD loss
def test_kd_loss_mean_divides_by_batch_times_classes():
    t = 2.0
    s, te = _t(STUDENT), _t(TEACHER)
    expected = t**2 * _kl_sum(STUDENT, TEACHER, t) / (2 * 3)
    _close(kd_loss(s, te, t, "mean"), expected, 1e-12)
    _close(kd_loss(s, te, t, "batchmean"), t**2 * _kl_sum(STUDENT, TEACHER, t) / 2, 1e-12)
    ratio = kd_loss(s, te, t, "batchmean") / kd_loss(s, te, t, "mean")
    _close(ratio, 3.0, 1e-12)  # exactly C


def test_kd_loss_is_zero_for_identical_logits_and_rejects_unknown_reduction():
    x = _t(STUDENT)
    _close(kd_loss(x, x, 20.0, "batchmean"), 0.0, 1e-12)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(x, x, 20.0, "sum")


# ------------------------------------------------------------------ entropies
def test_entropy_matches_manual_formula():
    h = entropy(_t(STUDENT))
    assert h.shape == (2,)
    for i, row in enumerate(STUDENT):
        _close(h[i], _entropy(row), 1e-12)
    _close(entropy(_t([[0.0, 0.0, 0.0]]))[0], math.log(3), 1e-12)


def test_normalized_entropy_min_over_batch():
    rows = [[4.0, 0.0, -1.0], [0.5, 0.0, 0.2], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]]
    h = normalized_entropy(_t(rows))
    for i, v in enumerate(_h_norm(rows)):
        _close(h[i], v, 1e-12)
    assert h[0].item() == 0.0  # the lowest-entropy sample gets exactly 0
    _close(h[2], 1.0, 1e-12)  # uniform logits: H = log C, so H′ = 1
    # The minimum is over the batch, so H′ of a sample depends on its batch mates.
    h_alone = normalized_entropy(_t(rows[1:]))
    assert not torch.allclose(h_alone, h[1:])
    # Float32 as well (the training dtype).
    torch.testing.assert_close(normalized_entropy(_t(rows, torch.float32)), h.float(), rtol=1e-5, atol=1e-6)


def test_normalized_entropy_gradient_flows_through_the_batch_minimum():
    x = _t([[4.0, 0.0, -1.0], [0.5, 0.0, 0.2]]).requires_grad_(True)
    normalized_entropy(x)[1].backward()
    assert x.grad[0].abs().sum() > 0  # sample 0 is the argmin: it moves sample 1's H′


@pytest.mark.parametrize(("lam_l", "lam_u"), [(0.3, 0.8), (0.1, 0.8), (0.5, 0.6)])
def test_balance_gap_manual_relu_sums(lam_l, lam_u):
    rows = [[4.0, 0.0, -1.0], [0.5, 0.0, 0.2], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], [0.9, -0.3, 0.1]]
    loss, h = balance_gap(_t(rows), lam_l, lam_u)
    _close(loss, _balance_gap(rows, lam_l, lam_u), 1e-12)
    for i, v in enumerate(_h_norm(rows)):
        _close(h[i], v, 1e-12)
    # The rows cover both bounds: at least one sample under λ_l and one above λ_u.
    assert min(_h_norm(rows)) < lam_l and max(_h_norm(rows)) > lam_u


def test_balance_gap_is_batch_size_independent():
    rows = [[4.0, 0.0, -1.0], [0.5, 0.0, 0.2], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]]
    x = _t(rows)
    loss, _ = balance_gap(x, 0.3, 0.8)
    loss2, _ = balance_gap(torch.cat([x, x]), 0.3, 0.8)
    loss3, _ = balance_gap(torch.cat([x, x, x]), 0.3, 0.8)
    _close(loss2, float(loss), 1e-12)
    _close(loss3, float(loss), 1e-12)
    # Any batch size works (the official code hard-codes 16).
    for b in (1, 5, 16, 17):
        assert torch.isfinite(balance_gap(torch.randn(b, 10), 0.3, 0.8)[0])


def test_student_entropy_loss():
    t = 4.0
    diff = _sub(TEACHER, STUDENT)
    expected = -(t**2) * sum(_entropy([v / t for v in row]) for row in diff) / len(diff)
    _close(student_entropy_loss(_t(TEACHER), _t(STUDENT), t), expected, 1e-12)
    # Agreement up to a per-row constant is the maximum: H = log C.
    p = _t(TEACHER)
    _close(student_entropy_loss(p, p + 3.0, t), -(t**2) * math.log(3), 1e-12)


# ------------------------------------------------------------------ AdaSG / AdaDFQ
def test_adasg_and_adadfq_config_defaults():
    sg, dfq_ = AdaSGConfig(), AdaDFQConfig()
    assert (sg.alpha_ds, sg.alpha_as, sg.lambda_l, sg.lambda_u, sg.beta, sg.gamma) == (0.1, 0.1, 0.3, 0.8, 1.0, 1.0)
    assert (dfq_.alpha_ds, dfq_.alpha_as, dfq_.lambda_l, dfq_.lambda_u, dfq_.beta, dfq_.gamma) == (
        0.2, 0.1, 0.1, 0.8, 1.0, 1.0,
    )  # fmt: skip
    assert sg.temperature == dfq_.temperature == 20.0  # CIFAR
    # The resolved run configs carry the same values, and each method gets its own section.
    assert resolve_config(None, {"method": "adasg"}).method == sg
    assert resolve_config(None, {"method": "adadfq"}).method == dfq_
    assert isinstance(create_method("adasg", sg), AdaSG) and isinstance(create_method("adadfq", dfq_), AdaDFQ)
    assert AdaSG.generator_uses_student and AdaDFQ.generator_uses_student


@pytest.mark.parametrize("cls", [AdaDFQ, AdaSG])
def test_adadfq_generator_loss_with_non_default_coefficients(cls):
    cfg = (AdaDFQConfig if cls is AdaDFQ else AdaSGConfig)(
        alpha_ds=0.3, alpha_as=0.7, lambda_l=0.4, lambda_u=0.6, beta=0.5, gamma=2.5
    )
    p = [[2.0, 0.0, -1.0], [-0.7, 1.5, 0.4], [0.1, 0.2, 0.3]]
    q = [[1.0, -0.5, 2.0], [0.3, 0.8, -1.2], [0.1, 0.25, 0.3]]
    y = [2, 0, 1]
    bns = 0.37
    out = Outputs(
        x=torch.zeros(3, 3, 4, 4),
        y=torch.tensor(y),
        p_logits=_t(p),
        q_logits=_t(q),
        bns=torch.tensor(bns, dtype=torch.float64),
    )
    losses = cls(cfg).generator_loss(out)
    d, a = _sub(p, q), _add(p, q)
    bg = _balance_gap(d, 0.4, 0.6)
    ds, as_ = _ce(d, y), _ce(a, y)
    _close(losses["bg"], bg, 1e-12)
    _close(losses["ds"], ds, 1e-12)
    _close(losses["as"], as_, 1e-12)
    _close(losses["loss"], bg + 0.5 * (0.3 * ds + 0.7 * as_) + 2.5 * bns, 1e-12)
    _close(losses["h_norm"], sum(_h_norm(d)) / 3, 1e-12)
    assert bg > 0  # the chosen logits put samples outside the gap


def test_adadfq_student_loss_is_the_tempered_disagreement_entropy():
    out = Outputs(x=torch.zeros(2, 3, 4, 4), y=torch.tensor(LABELS), p_logits=_t(TEACHER), q_logits=_t(STUDENT))
    losses = AdaDFQ(AdaDFQConfig(temperature=5.0)).student_loss(out)
    diff = _sub(TEACHER, STUDENT)
    _close(losses["loss"], -25.0 * sum(_entropy([v / 5.0 for v in r]) for r in diff) / 2, 1e-12)


def test_adasg_losses_with_its_defaults():
    p, q, y, bns = TEACHER, STUDENT, LABELS, 0.25
    out = Outputs(
        x=torch.zeros(2, 3, 4, 4),
        y=torch.tensor(y),
        p_logits=_t(p),
        q_logits=_t(q),
        bns=torch.tensor(bns, dtype=torch.float64),
    )
    g = AdaSG(AdaSGConfig()).generator_loss(out)["loss"]
    d = _sub(p, q)
    _close(g, _balance_gap(d, 0.3, 0.8) + 0.1 * _ce(d, y) + 0.1 * _ce(_add(p, q), y) + 1.0 * bns, 1e-12)
    s = AdaSG(AdaSGConfig()).student_loss(out)["loss"]
    _close(s, -400.0 * sum(_entropy([v / 20.0 for v in r]) for r in d) / 2, 1e-12)


# ------------------------------------------------------------------ GDFQ
def test_gdfq_config_defaults():
    c = GDFQConfig()
    assert (c.temperature, c.kd_weight, c.kd_reduction, c.bns_weight, c.ce_weight) == (20.0, 1.0, "mean", 0.1, 1.0)


def test_gdfq_losses():
    bns = 0.8
    out = Outputs(
        x=torch.zeros(2, 3, 4, 4),
        y=torch.tensor(LABELS),
        p_logits=_t(TEACHER),
        q_logits=_t(STUDENT),
        bns=torch.tensor(bns, dtype=torch.float64),
    )
    method = GDFQ(GDFQConfig())
    g = method.generator_loss(out)
    _close(g["ce"], _ce(TEACHER, LABELS), 1e-12)
    _close(g["loss"], _ce(TEACHER, LABELS) + 0.1 * bns, 1e-12)
    s = method.student_loss(out)
    kd = 20.0**2 * _kl_sum(STUDENT, TEACHER, 20.0) / (2 * 3)  # KLDivLoss 'mean': / (B·C)
    _close(s["kd"], kd, 1e-12)
    _close(s["ce"], _ce(STUDENT, LABELS), 1e-12)
    _close(s["loss"], kd + _ce(STUDENT, LABELS), 1e-12)
    # Non-default weights and the textbook reduction.
    c = GDFQConfig(temperature=3.0, kd_weight=0.5, kd_reduction="batchmean", ce_weight=2.0)
    s = GDFQ(c).student_loss(out)
    _close(s["loss"], 0.5 * 9.0 * _kl_sum(STUDENT, TEACHER, 3.0) / 2 + 2.0 * _ce(STUDENT, LABELS), 1e-12)


# ------------------------------------------------------------------ SCRM (ZAQ)
def test_scrm_matches_a_literal_loop_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    _close(scrm(s, t), _scrm_reference(s, t, 0.1), 1e-6)
    _close(scrm(s, t, gamma=0.7), _scrm_reference(s, t, 0.7), 1e-6)
    # Non-square maps: positions are flattened the same way in both.
    s2 = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64)
    t2 = torch.randn(1, 3, 2, 3, generator=g, dtype=torch.float64)
    _close(scrm(s2, t2), _scrm_reference(s2, t2, 0.1), 1e-6)
    # Float32, the training dtype.
    _close(scrm(s.float(), t.float()), _scrm_reference(s, t, 0.1), 1e-5)


def test_scrm_of_a_map_with_itself_is_zero_and_scale_invariant():
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    assert scrm(x, x).item() == 0.0
    # Channel-wise L2 normalisation makes SCRM blind to a positive rescaling of a map.
    torch.testing.assert_close(scrm(3.0 * x, x), torch.tensor(0.0), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ ZAQ
def _zaq_outputs():
    g = torch.Generator().manual_seed(2)
    p_feats = [torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    q_feats = [torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    out = Outputs(
        x=torch.zeros(2, 3, 4, 4), y=None, p_logits=_t(TEACHER), q_logits=_t(STUDENT), p_feats=p_feats, q_feats=q_feats
    )
    l1 = sum(abs(a - b) for ra, rb in zip(STUDENT, TEACHER, strict=True) for a, b in zip(ra, rb, strict=True)) / 6
    rel = sum(_scrm_reference(q, p) for q, p in zip(q_feats, p_feats, strict=True))
    act = float(p_feats[-1].abs().mean())
    return out, l1, rel, act


def test_zaq_config_defaults():
    c = ZAQConfig()
    assert (c.alpha, c.beta, c.gamma_r, c.feature_layers) == (1.0, 0.1, 0.1, [])
    assert ZAQ.student_steps == 5 and ZAQ.student_bn_train and not ZAQ.conditional and not ZAQ.uses_bns
    assert (c.generator.name, c.generator.latent_dim) == ("unconditional", 256)
    assert (c.train.batch_size, c.train.epochs, c.train.iters_per_epoch, c.train.q_lr) == (256, 300, 60, 0.1)
    assert resolve_config(None, {"method": "zaq"}).quant.act_observer == "minmax"  # the official range observer


class _RecordingGame:
    """Stands in for the training loop: records the steps a method's iteration asks for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fresh_batch(self) -> str:
        self.calls.append("fresh")
        return "fresh-batch"

    def generator_step(self) -> tuple[str, dict]:
        self.calls.append("G")
        return "g-batch", {"loss": torch.tensor(1.0)}

    def student_step(self, batch: str, train_q: bool) -> dict:
        self.calls.append(f"Q({batch})")
        return {"loss": torch.tensor(2.0)}

    def generator_then_student(self, train_q: bool) -> dict:
        self.calls.append("G-then-Q")
        return {}

    def logs(self, g_losses: dict, q_losses: dict | None) -> dict:
        return {"g": g_losses, "q": q_losses}


def test_zaq_iteration_is_five_fresh_q_steps_then_g():
    game = _RecordingGame()
    logs = ZAQ(ZAQConfig()).iteration(game, True)
    assert game.calls == ["fresh", "Q(fresh-batch)"] * 5 + ["G"]
    assert float(logs["g"]["loss"]) == 1.0 and float(logs["q"]["loss"]) == 2.0


@pytest.mark.parametrize("name", ["gdfq", "adasg", "adadfq"])
def test_the_other_games_use_the_default_g_then_q_iteration(name):
    game = _RecordingGame()
    create_method(name).iteration(game, True)
    assert game.calls == ["G-then-Q"]


def test_zaq_student_and_generator_losses():
    out, l1, rel, act = _zaq_outputs()
    method = ZAQ(ZAQConfig(alpha=0.7, beta=0.3))
    s = method.student_loss(out)
    _close(s["l1"], l1, 1e-12)
    _close(s["scrm"], rel, 1e-6)
    _close(s["loss"], l1 + 0.7 * rel, 1e-6)
    g = method.generator_loss(out)
    _close(g["act"], act, 1e-12)
    _close(g["loss"], -l1 - 0.7 * rel - 0.3 * act, 1e-6)
    # Defaults α = 1, β = 0.1.
    _close(ZAQ(ZAQConfig()).generator_loss(out)["loss"], -l1 - rel - 0.1 * act, 1e-6)


# ------------------------------------------------------------------ generators
def test_cifar_generator_shapes_eps_and_label_conditioning():
    torch.manual_seed(0)
    gen = CifarGenerator(num_classes=10, latent_dim=100, img_size=32)
    assert gen.bn0.eps == 1e-5 and gen.bn1.eps == 0.8 and gen.bn2.eps == 0.8
    assert not gen.out_bn.affine and gen.out_bn.weight is None
    assert gen.conditional and gen.latent_dim == 100
    z = torch.randn(1, 100).repeat(4, 1)
    z[2:] = torch.randn(2, 100)
    x = gen(z, torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    # The label embedding multiplies z: same noise, different labels, different images.
    assert not torch.allclose(x[0], x[1])
    # The final parameter-free BN standardises every channel over the batch.
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_imagenet_generator_class_conditional_bn():
    torch.manual_seed(0)
    gen = ImageNetGenerator(num_classes=10, latent_dim=100, img_size=32)  # 32 px keeps it small
    assert gen.l1.out_features == 128 * 8 * 8
    cbns = [gen.bn0, gen.bn1, gen.bn2]
    assert all(isinstance(m, ConditionalBatchNorm2d) for m in cbns)
    assert [m.bn.eps for m in cbns] == [1e-5, 0.8, 0.8]
    for m in cbns:
        assert not m.bn.affine
        assert torch.equal(m.gamma.weight, torch.ones_like(m.gamma.weight))
        assert torch.equal(m.beta.weight, torch.zeros_like(m.beta.weight))
    assert not gen.out_bn.affine
    z = torch.randn(1, 100).repeat(4, 1)
    z[2:] = torch.randn(2, 100)
    y = torch.tensor([0, 1, 2, 3])
    x = gen(z, y)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    # Labels enter only through the per-class γ/β tables, which start at 1/0.
    torch.testing.assert_close(x[0], x[1])
    with torch.no_grad():
        gen.bn1.gamma.weight[1].fill_(2.0)
        gen.bn1.beta.weight[1].fill_(0.5)
    x = gen(z, y)
    assert not torch.allclose(x[0], x[1])
    # Each class's row of the tables is trained: gradients reach the rows of the sampled labels only.
    gen(z, torch.tensor([0, 1, 0, 1])).square().mean().backward()
    assert gen.bn1.gamma.weight.grad[:2].abs().sum() > 0
    assert gen.bn1.gamma.weight.grad[2:].abs().sum() == 0


def test_conditional_batchnorm_applies_per_class_affine():
    cbn = ConditionalBatchNorm2d(num_classes=3, channels=2, eps=0.8)
    with torch.no_grad():
        cbn.gamma.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 3.0], [1.0, 1.0]]))
        cbn.beta.weight.copy_(torch.tensor([[0.0, 0.0], [0.5, -1.0], [0.0, 0.0]]))
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1])
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 0.8)
    expected = normed.clone()
    expected[[1, 3], 0] = 2.0 * normed[[1, 3], 0] + 0.5
    expected[[1, 3], 1] = 3.0 * normed[[1, 3], 1] - 1.0
    torch.testing.assert_close(cbn(x, y), expected, rtol=1e-5, atol=1e-5)


def test_unconditional_generator():
    torch.manual_seed(0)
    gen = UnconditionalGenerator(num_classes=10, latent_dim=256, img_size=32)
    assert not gen.conditional
    assert gen.bn1.eps == 1e-5 and gen.bn2.eps == 1e-5 and not gen.out_bn.affine
    z = torch.randn(4, 256, 1, 1)  # ZAQ draws z as (B, nz, 1, 1)
    x = gen(z)
    assert x.shape == (4, 3, 32, 32)
    torch.testing.assert_close(gen(z.flatten(1)), gen(z))


def test_create_generator():
    gen = create_generator("imagenet", 10, 8, 16, channels=1)
    assert isinstance(gen, ImageNetGenerator)
    x = gen(torch.randn(2, 16), torch.tensor([0, 1]))
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(DFQError, match="divisible by 4"):
        create_generator("cifar", 10, 30, 100)
    with pytest.raises(DFQError, match="unknown generator"):
        create_generator("cifra", 10, 32, 100)


def test_unit_channels_matches_f_normalize_and_has_no_gradient_at_zero_positions():
    """SCRM's normalisation: F.normalize's values, but an all-zero position (after a ReLU) gets zero gradient,
    where F.normalize's 1e-12 clamp gives it 1e12 x the upstream gradient (it made ZAQ's Q diverge in one step)."""
    x = torch.randn(2, 4, 5)
    x[0, :, 2] = 0.0  # one all-zero position
    x.requires_grad_()
    out = unit_channels(x)
    torch.testing.assert_close(out, F.normalize(x, dim=1), rtol=0, atol=1e-7)
    assert torch.equal(out[0, :, 2], torch.zeros(4))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    assert torch.equal(grad[0, :, 2], torch.zeros(4))
    (ref,) = torch.autograd.grad((F.normalize(x, dim=1) * upstream).sum(), x)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :, 2] = False
    torch.testing.assert_close(grad[mask], ref[mask])
    assert ref[0, :, 2].abs().max() > 1e6  # the clamp's gradient, avoided


def test_scrm_gradient_stays_bounded_with_dead_positions():
    s = torch.relu(torch.randn(2, 8, 4, 4))
    s[:, :, 0, 0] = 0.0
    s.requires_grad_()
    (grad,) = torch.autograd.grad(scrm(s, torch.relu(torch.randn(2, 8, 4, 4))), s)
    assert torch.isfinite(grad).all() and grad.abs().max() < 10
