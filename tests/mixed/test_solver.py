"""The bit-allocation solver against brute force on small hand-made problems, exact budgets, clear infeasibility."""

from __future__ import annotations

import itertools
import random

import pytest

from dfq.errors import DFQError
from dfq.mixed import Choice, ModelTensors, Problem, parse_bops, parse_size, parse_uniform, solve
from dfq.mixed.tensors import Layer


def _problem(seed: int, pairs: bool = False) -> Problem:
    """Three layers (the first reads the 8-bit model input), two activation sites, random losses and budgets."""
    rng = random.Random(seed)
    choices = [Choice(f"l{i}", "w", rng.randint(10, 200), pointwise=i == 2) for i in range(3)]
    choices += [Choice("s0", "a"), Choice("s1", "a")]
    layers = [Layer("l0", rng.randint(100, 5000), None, 8), Layer("l1", rng.randint(100, 5000), "s0:a", 4),
              Layer("l2", rng.randint(100, 5000), "s1:a", 4)]  # fmt: skip
    tensors = ModelTensors(choices, layers)
    options = {c.name: (2, 4, 8) for c in choices}
    options["s1:a"] = (4, 8)
    loss = {c: {b: rng.uniform(0, 1) / b**1.5 for b in opts} for c, opts in options.items()}
    low, high = tensors.uniform(2, 4), tensors.uniform(8, 8)
    size = rng.randint(tensors.weight_bits(low), tensors.weight_bits(high))
    bops = rng.randint(tensors.bops(low), tensors.bops(high))
    allowed = frozenset({(4, 8), (8, 8), (2, 4), (4, 4), (8, 4)}) if pairs else frozenset()
    return Problem(tensors, options, loss, size, bops, allowed)


def _brute_force(problem: Problem) -> float | None:
    names = list(problem.options)
    best = None
    for combo in itertools.product(*(problem.options[n] for n in names)):
        bits = dict(zip(names, combo, strict=True))
        if problem.fits(bits):
            value = problem.predicted(bits)
            best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_solver_finds_the_brute_force_optimum(seed: int, pairs: bool) -> None:
    problem = _problem(seed, pairs)
    best = _brute_force(problem)
    if best is None:
        with pytest.raises(DFQError, match="no bit allocation fits"):
            solve(problem)
        return
    bits = solve(problem)
    assert problem.fits(bits)  # options, pairs and both budgets, in exact integer arithmetic
    assert problem.predicted(bits) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_a_budget_equal_to_a_uniform_cost_admits_exactly_that_cost() -> None:
    problem = _problem(0)
    t = problem.tensors
    problem.options = {c.name: (2, 4, 8) for c in t.choices}
    problem.loss = {c: {2: 3.0, 4: 2.0, 8: 1.0} for c in problem.options}
    problem.max_weight_bits = t.weight_bits(t.uniform(4, 4))
    problem.max_bops = t.bops(t.uniform(4, 4))
    bits = solve(problem)
    assert t.weight_bits(bits) <= problem.max_weight_bits and t.bops(bits) <= problem.max_bops
    assert problem.predicted(bits) <= problem.predicted(t.uniform(4, 4))  # uniform W4A4 itself is feasible


def test_bops_multiply_the_weight_bits_by_the_bits_of_the_input_read() -> None:
    problem = _problem(1)
    t = problem.tensors
    bits = {"l0:w": 2, "l1:w": 4, "l2:w": 8, "s0:a": 8, "s1:a": 4}
    expected = t.layers[0].macs * 2 * 8 + t.layers[1].macs * 4 * 8 + t.layers[2].macs * 8 * 4
    assert t.bops(bits) == expected
    assert t.weight_bits(bits) == sum(c.params * bits[c.name] for c in t.choices if c.kind == "w")


def test_an_infeasible_budget_names_the_smallest_reachable_cost() -> None:
    problem = _problem(2)
    problem.max_weight_bits = 1
    with pytest.raises(DFQError, match=r"no bit allocation fits: the smallest weights take .* bytes"):
        solve(problem)


def test_budget_strings() -> None:
    assert parse_size("0.5MB") == 500_000 and parse_size("180KB") == 180_000 and parse_size(1000) == 1000
    assert parse_size("1MiB") == 2**20
    assert parse_bops("2.5G") == 2.5e9 and parse_bops("3e6") == 3e6
    assert parse_uniform("w4a8") == (4, 8)
    for bad in ("lots", "5 parsecs"):
        with pytest.raises(DFQError, match="size budget"):
            parse_size(bad)
    with pytest.raises(DFQError, match="W4A8"):
        parse_uniform("W4")
    with pytest.raises(DFQError, match="from 2 to 8"):
        parse_uniform("W9A4")
