"""The quantile sketch: exact while small, within 1 % of numpy's percentiles when large."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunerd.sketch import EXACT_CAP, QuantileSketch

QS = (0.0, 0.5, 0.95, 0.99, 1.0)


def sketch_of(values: list[float]) -> QuantileSketch:
    s = QuantileSketch()
    for v in values:
        s.add(v)
        s.settle()
    return s


def test_small_samples_are_exact() -> None:
    values = [1912.0, 1203.0, 370.0, 446.0, 0.0, 4842.0]
    s = sketch_of(values)
    assert s.exact
    for q in QS:
        assert s.quantile(q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert (s.count, s.total, s.min, s.max) == (6, sum(values), 0.0, 4842.0)


@pytest.mark.parametrize("n", [EXACT_CAP + 1, 5_000, 100_000])
def test_large_samples_within_one_percent(n: int) -> None:
    rnd = random.Random(n)
    values = [rnd.lognormvariate(7, 1.2) for _ in range(n)] + [0.0] * (n // 50)
    s = sketch_of(values)
    assert not s.exact
    for q in QS[1:]:
        exact = float(np.percentile(values, q * 100))
        assert s.quantile(q) == pytest.approx(exact, rel=0.01)
    assert s.mean == pytest.approx(float(np.mean(values)), rel=1e-6)
    assert s.max == pytest.approx(max(values), rel=1e-6)


def test_memory_is_bounded() -> None:
    s = sketch_of([float(i % 5000 + 1) for i in range(200_000)])
    assert len(s._pending) <= EXACT_CAP
    assert s._bins is not None and len(s._bins) < 2000


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=3000),
    st.integers(min_value=1, max_value=5),
)
def test_merge_in_any_split_equals_one_sketch(values: list[int], parts: int) -> None:
    whole = sketch_of([float(v) for v in values])
    pieces = [QuantileSketch() for _ in range(parts)]
    for i, v in enumerate(values):
        pieces[i % parts].add(float(v))
        pieces[i % parts].settle()
    merged = QuantileSketch()
    for piece in pieces:
        merged.merge(pickle.loads(pickle.dumps(piece)))
    assert merged.count == whole.count == len(values)
    assert merged.exact == whole.exact
    for q in QS:
        assert merged.quantile(q) == pytest.approx(whole.quantile(q), rel=1e-9)
        exact = float(np.percentile(values, q * 100))
        assert merged.quantile(q) == pytest.approx(exact, rel=0.01, abs=1e-9)
