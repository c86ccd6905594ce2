"""A mergeable quantile sketch with a relative-error guarantee.

Durations are summarised by a DDSketch-style log histogram: a value ``x > 0`` falls in bin
``ceil(log(x) / log(gamma))`` with ``gamma = (1 + a) / (1 - a)``, and every bin is reported as the
one value within ``a`` (relative) of everything in it. Quantiles are interpolated between order
statistics exactly as ``numpy.percentile(..., method="linear")`` does, so each estimate is within
``a`` of the exact linear-interpolation quantile (both neighbours are, hence any point between).

Small samples are kept exactly (most crons run a few hundred times a week): the sketch is exact
while it holds at most ``EXACT_CAP`` values, and only then becomes a histogram. Whether it is exact
depends only on the count, never on the order values arrived in or how sketches were merged, so a
file read in one piece or in parallel ranges gives the same answer.

Binning is batched through NumPy, imported only when a sketch first outgrows its exact buffer, so a
small log never pays for the import.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

RELATIVE_ACCURACY = 0.005
"""Half the 1 % the statistics promise: a margin for float rounding."""
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
EXACT_CAP = 1024
"""Up to this many values the sketch is exact (it keeps them verbatim). Beyond, pending values
are folded into the histogram once this many have gathered (NumPy's per-call cost, amortised)."""
_SMALL = 64
"""Up to this many values, plain Python summarises them faster than a call into NumPy."""


def _np() -> Any:
    import numpy

    return numpy


class QuantileSketch:
    """Count, sum, min, max and quantiles of non-negative values in bounded memory.

    ``add`` is the ``append`` of a buffer of single-precision values (it is on the hot path of
    reading a log, and 24 bits keep a duration to well under the sketch's accuracy). The owner calls
    ``settle`` now and then; the buffer is folded into the histogram, with its count, sum and
    extremes, once it holds more than ``EXACT_CAP`` values. Queries fold what they need first.
    """

    __slots__ = (
        "_bins",
        "_count",
        "_max",
        "_min",
        "_offset",
        "_pending",
        "_total",
        "_zeros",
    )

    def __init__(self) -> None:
        self._pending = array("f")
        self._count = 0  # folded values only; the same for _total, _min, _max
        self._total = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._bins: npt.NDArray[np.int64] | None = None
        self._offset = 0
        self._zeros = 0

    def add(self, value: float) -> None:
        """Record one value (callers guarantee ``value >= 0``)."""
        self._pending.append(value)

    def extend(self, values: bytes) -> None:
        """Record many values at once, given as native float32 bytes."""
        self._pending.frombytes(values)
        self.settle()

    def settle(self) -> None:
        """Fold the buffer if it has grown past ``EXACT_CAP`` (bounds memory; cheap otherwise)."""
        if len(self._pending) > EXACT_CAP:
            self._flush()

    @property
    def count(self) -> int:
        return self._count + len(self._pending)

    @property
    def total(self) -> float:
        pending = self._pending
        if len(pending) > _SMALL:
            return self._total + float(_np().frombuffer(pending, dtype="f4").sum(dtype="f8"))
        return self._total + sum(pending)

    @property
    def min(self) -> float:
        pending = self._pending
        if len(pending) > _SMALL:
            return min(self._min, float(_np().frombuffer(pending, dtype="f4").min()))
        return min(self._min, min(pending, default=math.inf))

    @property
    def max(self) -> float:
        pending = self._pending
        if len(pending) > _SMALL:
            return max(self._max, float(_np().frombuffer(pending, dtype="f4").max()))
        return max(self._max, max(pending, default=-math.inf))

    @property
    def exact(self) -> bool:
        return self.count <= EXACT_CAP

    @property
    def mean(self) -> float:
        count = self.count
        return self.total / count if count else math.nan

    def merge(self, other: QuantileSketch) -> None:
        """Add ``other``'s values to this sketch (``other`` is left unchanged)."""
        self._count += other._count
        self._total += other._total
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        self._zeros += other._zeros
        if other._bins is not None:
            self._add_bins(other._offset, other._bins)
        self._pending.extend(other._pending)
        self.settle()

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1), by linear interpolation between order statistics."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Several quantiles for the price of one sort (or one pass over the histogram)."""
        count = self.count
        if not count:
            return [math.nan] * len(qs)
        if count <= EXACT_CAP:
            if count > _SMALL:
                ordered = _np().sort(_np().frombuffer(self._pending, dtype="f4")).tolist()
            else:
                ordered = sorted(self._pending)
            return [_interpolate(q, count, ordered.__getitem__) for q in qs]
        self._flush()
        bins, zeros, offset = self._bins, self._zeros, self._offset
        cumulative = _np().cumsum(bins) if bins is not None else None
        low, high = self._min, self._max

        def order_statistic(k: int) -> float:
            if k < zeros or cumulative is None:
                return 0.0
            i = int(_np().searchsorted(cumulative, k - zeros + 1))
            return min(max(2.0 * _GAMMA ** (offset + i) / (_GAMMA + 1.0), low), high)

        return [_interpolate(q, count, order_statistic) for q in qs]

    def _flush(self) -> None:
        """Fold pending values into the histogram (only ever once the sketch is not exact)."""
        if not self._pending:
            return
        np = _np()
        values = np.frombuffer(self._pending, dtype=np.float32).astype(np.float64)
        self._count += len(values)
        self._total += float(values.sum())
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        positive = values[values > 0]
        self._zeros += len(values) - len(positive)
        if len(positive):
            index = np.ceil(np.log(positive) / _LOG_GAMMA).astype(np.int64)
            low = int(index.min())
            self._add_bins(low, np.bincount(index - low))
        del self._pending[:]

    def _add_bins(self, offset: int, counts: npt.NDArray[np.int64]) -> None:
        np = _np()
        if self._bins is None:
            self._bins, self._offset = counts.astype(np.int64, copy=True), offset
            return
        low = min(self._offset, offset)
        high = max(self._offset + len(self._bins), offset + len(counts))
        if (low, high) != (self._offset, self._offset + len(self._bins)):
            grown = np.zeros(high - low, dtype=np.int64)
            grown[self._offset - low : self._offset - low + len(self._bins)] = self._bins
            self._bins, self._offset = grown, low
        self._bins[offset - low : offset - low + len(counts)] += counts

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class _Discard(QuantileSketch):
    """A sketch that keeps nothing, shared by every bucket of statistics that count without
    durations (the daemon's: nothing it does reads a duration from memory)."""

    __slots__ = ()

    def add(self, value: float) -> None:
        pass

    def extend(self, values: bytes) -> None:
        pass

    def merge(self, other: QuantileSketch) -> None:
        pass

    def __reduce__(self) -> str:
        return "DISCARD"  # pickled by name: one instance however many buckets refer to it


DISCARD: QuantileSketch = _Discard()


def _interpolate(q: float, n: int, order_statistic: Any) -> float:
    """numpy's default ("linear") quantile over ``n`` order statistics."""
    h = (n - 1) * min(max(q, 0.0), 1.0)
    lo = math.floor(h)
    low_value: float = order_statistic(lo)
    if h == lo:
        return low_value
    high_value: float = order_statistic(lo + 1)
    return low_value + (h - lo) * (high_value - low_value)
