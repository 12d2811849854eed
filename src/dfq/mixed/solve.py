"""The bit allocation with the least predicted loss under size and bit-operation budgets: an integer linear
program (HAWQ-V3, Yao et al., ICML 2021) solved exactly by SciPy's ``milp`` (HiGHS).

One binary ``x[c, b]`` per choice ``c`` and bit-width ``b``, exactly one per choice. The size is linear in
``x``. A layer's bit-operations ``macs * w * a`` multiply its weight choice by the activation choice it reads;
each product gets a continuous ``z[l, w, a] >= x[l, w] + x[r, a] - 1`` (``z >= 0``), so ``z`` is 1 where both
are chosen, and since ``z`` only enters the budget row the cheapest ``z`` is the true product: a solution is
feasible exactly when its real bit-operations fit. Accelerator rules (allowed weight/activation pairs) are rows
``x[l, w] + x[r, a] <= 1`` for the pairs they forbid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dfq.errors import DFQError
from dfq.mixed.tensors import ModelTensors

__all__ = ["Problem", "solve"]


@dataclass
class Problem:
    """An allocation problem.

    Attributes:
        tensors: the choices and the layers' costs.
        options: choice name -> the bit-widths it may take.
        loss: choice name -> bit-width -> predicted loss (the objective adds them up).
        max_weight_bits: budget on the bits of all weight codes (``None``: none).
        max_bops: budget on the bit-operations (``None``: none).
        pairs: allowed (weight bits, input bits) of every layer (empty: any).
    """

    tensors: ModelTensors
    options: dict[str, tuple[int, ...]]
    loss: dict[str, dict[int, float]]
    max_weight_bits: int | None = None
    max_bops: int | None = None
    pairs: frozenset[tuple[int, int]] = field(default_factory=frozenset)

    def predicted(self, bits: dict[str, int]) -> float:
        return sum(self.loss[c][b] for c, b in bits.items())

    def fits(self, bits: dict[str, int]) -> bool:
        """Whether ``bits`` respects the options, the pairs and both budgets (exact integer arithmetic)."""
        t = self.tensors
        return (
            all(bits[c] in opts for c, opts in self.options.items())
            and (self.max_weight_bits is None or t.weight_bits(bits) <= self.max_weight_bits)
            and (self.max_bops is None or t.bops(bits) <= self.max_bops)
            and (not self.pairs or all((bits[f"{lay.key}:w"], t.input_bits_of(lay, bits)) in self.pairs
                                       for lay in t.layers))
        )  # fmt: skip


def solve(problem: Problem) -> dict[str, int]:
    """The feasible allocation (choice name -> bits) with the least predicted loss.

    Raises:
        DFQError: no allocation fits the budgets and rules (the message gives the smallest reachable size and
            bit-operations).
    """
    margin = 0.0
    for _ in range(4):  # HiGHS accepts rows violated by its tolerance; tighten until the exact check passes
        bits = _solve_once(problem, margin)
        if problem.fits(bits):
            return bits
        margin = max(2 * margin, 1e-9)
    raise DFQError("the bit allocation solver returned an allocation over budget; loosen the budget slightly")


def _solve_once(problem: Problem, margin: float) -> dict[str, int]:
    from scipy.optimize import Bounds, LinearConstraint, milp  # half a second to import: only when solving

    index: dict[tuple[str, int], int] = {}
    for c, opts in problem.options.items():
        for b in opts:
            index[c, b] = len(index)
    t = problem.tensors
    products = _products(problem)  # (layer, w, a) with a chosen input
    n = len(index) + len(products)
    rows: list[tuple[dict[int, float], float, float]] = []
    for c, opts in problem.options.items():
        rows.append(({index[c, b]: 1.0 for b in opts}, 1.0, 1.0))
    if problem.max_weight_bits is not None:
        size = {index[c.name, b]: float(c.params * b) for c in t.choices if c.kind == "w"
                for b in problem.options[c.name]}  # fmt: skip
        rows.append((_scaled(size, problem.max_weight_bits), -np.inf, 1.0 - margin))
    if problem.max_bops is not None:
        rows.append((_scaled(_bops_row(problem, index, products), problem.max_bops), -np.inf, 1.0 - margin))
    for j, (lay, w, a) in enumerate(products):  # z >= x_w + x_a - 1
        rows.append(({len(index) + j: 1.0, index[f"{lay.key}:w", w]: -1.0, index[lay.reads, a]: -1.0}, -1.0, np.inf))
    if problem.pairs:
        for lay in t.layers:
            if lay.reads is None:  # the model input's fixed bits: only the weights the pairs allow
                for w in problem.options[f"{lay.key}:w"]:
                    if (w, lay.input_bits) not in problem.pairs:
                        rows.append(({index[f"{lay.key}:w", w]: 1.0}, 0.0, 0.0))
                continue
            for w in problem.options[f"{lay.key}:w"]:
                for a in problem.options[lay.reads]:
                    if (w, a) not in problem.pairs:
                        rows.append(({index[f"{lay.key}:w", w]: 1.0, index[lay.reads, a]: 1.0}, -np.inf, 1.0))
    a_mat = np.zeros((len(rows), n))
    for i, (coeffs, _, _) in enumerate(rows):
        for j, v in coeffs.items():
            a_mat[i, j] = v
    cost = np.zeros(n)
    for (c, b), j in index.items():
        cost[j] = problem.loss[c][b]
    integrality = np.r_[np.ones(len(index)), np.zeros(len(products))]
    result = milp(cost, constraints=LinearConstraint(a_mat, [r[1] for r in rows], [r[2] for r in rows]),
                  integrality=integrality, bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})  # fmt: skip
    if result.status == 2 or result.x is None:
        raise DFQError(_infeasible(problem))
    if not result.success:
        raise DFQError(f"the bit allocation solver failed: {result.message}")
    return {c: b for (c, b), j in index.items() if result.x[j] > 0.5}


def _products(problem: Problem) -> list:
    return [(lay, w, a) for lay in problem.tensors.layers if lay.reads is not None
            for w in problem.options[f"{lay.key}:w"] for a in problem.options[lay.reads]]  # fmt: skip


def _bops_row(problem: Problem, index: dict, products: list) -> dict[int, float]:
    row: dict[int, float] = {}
    for lay in problem.tensors.layers:
        if lay.reads is None:  # fixed input bits: linear in the weight choice
            for w in problem.options[f"{lay.key}:w"]:
                j = index[f"{lay.key}:w", w]
                row[j] = row.get(j, 0.0) + float(lay.macs * w * lay.input_bits)
    for k, (lay, w, a) in enumerate(products):
        row[len(index) + k] = float(lay.macs * w * a)
    return row


def _scaled(row: dict[int, float], budget: int) -> dict[int, float]:
    """A budget row divided by the budget (HiGHS's tolerances are relative to order-one rows)."""
    if budget <= 0:
        raise DFQError(f"a budget must be positive, got {budget}")
    return {j: v / budget for j, v in row.items()}


def _infeasible(problem: Problem) -> str:
    t = problem.tensors
    low = {c: min(opts) for c, opts in problem.options.items()}
    parts = []
    if problem.max_weight_bits is not None:
        parts.append(f"the smallest weights take {t.weight_bits(low) / 8:,.0f} bytes (budget "
                     f"{problem.max_weight_bits / 8:,.0f})")  # fmt: skip
    if problem.max_bops is not None:
        parts.append(f"the fewest bit-operations are {t.bops(low):,} (budget {problem.max_bops:,})")
    rules = " under the allowed weight/activation pairs" if problem.pairs else ""
    detail = ": " + "; ".join(parts) if parts else ""
    return f"no bit allocation fits{rules}{detail}; raise the budget or allow lower bit-widths"
