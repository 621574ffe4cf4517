"""Fixed-point encoding of floats as integers modulo 2**128, for secure (masked) sums.

A float ``x`` becomes ``round(x * 2**FRACTION_BITS) mod MODULUS``; sums of encodings
modulo ``MODULUS`` decode to the sum of the floats. Python integers carry the 128 bits.

Error bound, per entry of a sum over ``k`` sites: each encoding rounds to the nearest
multiple of ``2**-FRACTION_BITS``, so the exact sum of the encodings is within
``k * 2**-(FRACTION_BITS + 1)`` (about ``k * 1.8e-15``) of the exact sum of the floats;
decoding adds one float rounding (relative ``2**-53``). The plain float sum has its own
rounding of the same order, so both agree to ``k * 2**-(FRACTION_BITS + 1)`` absolute
plus a few ulps of the sum.

Overflow cannot happen silently: a value with ``|x| > MAX_ABS`` (or not finite) is
refused when encoded, and with at most ``MAX_SITES`` sites every sum stays inside the
signed range ``(-MODULUS/2, MODULUS/2)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shared.errors import DataError

MODULUS = 2**128
FRACTION_BITS = 48
MAX_SITES = 2**8
MAX_ABS = 2.0 ** (127 - FRACTION_BITS - 8 - 1)  # 2**70: MAX_SITES of these still fit
RESOLUTION = 2.0**-FRACTION_BITS
_HALF = MODULUS // 2


def encode(values: Iterable[float], what: str = "value") -> list[int]:
    """The fixed-point encodings of ``values``; a non-finite or too large value is an error."""
    encoded = []
    for index, value in enumerate(values):
        if not math.isfinite(value) or abs(value) > MAX_ABS:
            raise DataError(
                f"{what}[{index}] = {value!r} cannot be encoded for a secure sum (finite values "
                f"up to {MAX_ABS:g} in magnitude). Fix: check the analysis for separation or an "
                f"empty arm; secure aggregation cannot carry it."
            )
        encoded.append(round(value * 2**FRACTION_BITS) % MODULUS)  # exact: scaling by 2**k is exact
    return encoded


def signed(value: int) -> int:
    """The integer in ``(-MODULUS/2, MODULUS/2]`` congruent to ``value``."""
    value %= MODULUS
    return value - MODULUS if value > _HALF else value


def decode(values: Sequence[int]) -> list[float]:
    """Floats from (summed) encodings: the signed residue scaled back."""
    return [math.ldexp(float(signed(v)), -FRACTION_BITS) for v in values]


def add(vectors: Sequence[Sequence[int]]) -> list[int]:
    """Entry-wise sum modulo ``MODULUS`` of equally long integer vectors."""
    lengths = {len(vector) for vector in vectors}
    if len(lengths) != 1:
        raise ValueError(f"vectors of different lengths {sorted(lengths)} cannot be added")
    return [sum(column) % MODULUS for column in zip(*vectors, strict=True)]
