"""The checkpoint policy: which tensors are compressed, auto's candidate set and allocation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lplr_dask.checkpoint.policy import (
    TensorPolicy,
    allocate,
    candidate_set,
    classify,
    method_candidate,
    nq_bits_for_budget,
)
from lplr_dask.core.params import CompressionOptions
from lplr_dask.errors import ParameterError


def test_classify_defaults():
    p = TensorPolicy()
    assert classify("encoder.layer.0.attention.self.query.weight", [384, 384], "F32", p)[0]
    assert classify("embeddings.word_embeddings.weight", [30522, 384], "BF16", p)[0]
    assert classify("dense.bias", [384], "F32", p) == (False, "1-D (bias, norm or buffer)")
    assert not classify("layer.LayerNorm.weight", [384, 2], "F32", p)[0]  # norms always pass
    assert classify("position_ids", [1, 512], "I64", p) == (False, "dtype I64")
    assert not classify("token_type_embeddings.weight", [2, 384], "F32", p)[0]  # min_dim
    assert not classify("tiny.weight", [32, 32], "F16", p)[0]  # min_size 4096
    assert not classify("conv.weight", [64, 3, 3, 3], "F32", p)[0]


def test_classify_patterns_embeddings_and_overrides():
    p = TensorPolicy(
        include=["encoder.*", "re:^pooler\\."],
        exclude=["*.value.weight"],
        compress_embeddings=False,
        overrides={"*.key.weight": "skip", "embeddings.word_*": {"method": "nq"}},
    )
    assert classify("encoder.0.query.weight", [64, 64], "F32", p)[0]
    assert classify("pooler.dense.weight", [64, 64], "F32", p)[0]
    assert classify("decoder.0.query.weight", [64, 64], "F32", p) == (
        False,
        "not matched by include",
    )
    assert classify("encoder.0.value.weight", [64, 64], "F32", p) == (False, "matched by exclude")
    assert classify("encoder.0.key.weight", [64, 64], "F32", p) == (False, "override: skip")
    assert not classify("embeddings.position_embeddings.weight", [512, 64], "F32", p)[0]
    # An explicit override wins over compress_embeddings=False and include.
    assert classify("embeddings.word_embeddings.weight", [512, 64], "F32", p) == (
        True,
        "override",
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(include=["re:("]), "not a valid regular expression"),
        (dict(min_size=-1), "min_size"),
        (dict(overrides={"x": {"bits": 4}}), "unknown option"),
        (dict(overrides={"x": {"method": "svd"}}), "unknown"),
        (dict(overrides={"x": 4}), "'skip' or a dict"),
    ],
)
def test_policy_validation(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        TensorPolicy(**kwargs)


def test_policy_round_trips_through_dict():
    p = TensorPolicy(include=["a*"], overrides={"b*": {"method": "nq", "bits_matrix": 4}})
    assert TensorPolicy.from_dict(p.to_dict()) == p


def test_auto_candidates_hold_every_single_method():
    shape = (384, 1536)
    cands = {c.key: c for c in candidate_set(shape, method="auto", budget=2.5)}
    for b in (2.0, 2.5, 3.0, 4.0):
        for m in ("nq", "lplr", "paper", "nq+lplr"):
            c = method_candidate(m, shape, budget=b, group_size=128, seed=0)
            assert c is not None and c.key in cands, (m, b)
            assert cands[c.key].options == c.options
    assert {f"nq-q{b}-g128" for b in range(1, 9)} <= set(cands)


def test_nq_bits_for_budget_is_exact():
    # symmetric group-wise codes: b bits + one float32 per 128 entries = b + 0.25
    assert nq_bits_for_budget((256, 256), budget=4.25, group_size=128) == 4
    assert nq_bits_for_budget((256, 256), budget=4.24, group_size=128) == 3
    assert nq_bits_for_budget((256, 256), budget=1.2, group_size=128) is None
    cfg = CompressionOptions(method="nq", bits_matrix=3, group_size=128).resolve((256, 256))
    assert cfg.bits_per_entry((256, 256)) == 3.25


def brute_force(curves, total_bits):
    names = list(curves)
    best = None
    for combo in itertools.product(*(curves[n].items() for n in names)):
        bits = sum(p[1][0] for p in combo)
        err = sum(p[1][1] for p in combo)
        if bits <= total_bits and (best is None or err < best[0]):
            best = (err, {n: p[0] for n, p in zip(names, combo, strict=True)})
    return best


def total(curves, choice):
    return (
        sum(curves[t][k][0] for t, k in choice.items()),
        sum(curves[t][k][1] for t, k in choice.items()),
    )


def test_allocate_is_optimal_on_convex_curves():
    """Convex error curves (error ∝ 4^-bits, as for uniform quantizers): the Lagrangian plus
    greedy fill finds the exact optimum found by enumeration."""
    weights = {"a": 1.0, "b": 10.0, "c": 0.1, "d": 3.0}
    curves = {
        t: {f"{b}": (1000.0 * b, w * 4.0**-b) for b in range(1, 9)} for t, w in weights.items()
    }
    for budget in (2.0, 3.0, 4.5, 6.0):
        tb = budget * 4000
        choice = allocate(curves, total_bits=tb)
        bits, err = total(curves, choice)
        assert bits <= tb
        assert err == pytest.approx(brute_force(curves, tb)[0], rel=1e-12)
        # harder (larger) tensors get more bits
        assert int(choice["b"]) >= int(choice["a"]) >= int(choice["c"])


def test_allocate_keeps_the_budget_and_beats_baselines_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        curves = {}
        for t in range(4):
            size = int(rng.integers(1, 6)) * 1000
            pts = {}
            for j in range(int(rng.integers(1, 6))):
                bits = float(rng.uniform(0.5, 8)) * size
                pts[f"k{j}"] = (bits, float(rng.uniform(0, 1)) * size)
            curves[f"t{t}"] = pts
        cheapest = sum(min(b for b, _ in c.values()) for c in curves.values())
        tb = cheapest * float(rng.uniform(1.0, 2.5))
        baselines = [{t: rng.choice(sorted(c)) for t, c in curves.items()} for _ in range(3)]
        choice = allocate(curves, total_bits=tb, baselines=baselines)
        bits, err = total(curves, choice)
        assert bits <= tb
        for base in baselines:
            b_bits, b_err = total(curves, base)
            if b_bits <= tb:
                assert err <= b_err
        opt = brute_force(curves, tb)[0]
        assert err >= opt - 1e-9


def test_allocate_refuses_an_impossible_budget():
    curves = {"a": {"x": (100.0, 1.0)}, "b": {"y": (50.0, 1.0), "z": (80.0, 0.5)}}
    with pytest.raises(ParameterError, match="cheapest candidates need 150"):
        allocate(curves, total_bits=149)
    assert allocate(curves, total_bits=150) == {"a": "x", "b": "y"}
    assert allocate(curves, total_bits=1000) == {"a": "x", "b": "z"}
