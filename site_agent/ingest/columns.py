"""Typed columns from an export's text (or loosely typed parquet) columns.

Accepted text, per target type (surrounding spaces ignored; a blank field is null):

- whole numbers: ``-42``, ``+42``, ``42.0`` (an integral decimal, as pandas writes ids of a
  column with nulls); 64-bit ids, 32-bit concept ids and counts;
- numbers: anything Arrow reads as a float64 (``1.5``, ``-2e3``);
- dates: ``YYYY-MM-DD``, ``YYYYMMDD`` (OHDSI Athena's vocabulary files), or a date-time whose
  date part is taken (``2020-01-31 00:00:00``);
- date-times: ``YYYY-MM-DD``, ``YYYY-MM-DD HH:MM[:SS[.ffffff]]`` (or ``T`` between), no zone;
- text: kept exactly as written.

``convert`` raises Arrow's error on the first bad value; ``first_bad_row`` then finds its row
by bisection, so a clean column costs one vectorised cast and a bad one a few more.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

_CAST_ERRORS = (pa.ArrowException, OverflowError)  # Arrow's invalid, type and unsupported casts


def describe(target: pa.DataType) -> str:
    """What a value of ``target`` looks like, for error messages."""
    if pa.types.is_int64(target):
        return "a whole number (a 64-bit id)"
    if pa.types.is_int32(target):
        return "a whole number between -2147483648 and 2147483647 (32-bit: concept ids, years, counts)"
    if pa.types.is_floating(target):
        return "a number"
    if pa.types.is_date(target):
        return "a date (YYYY-MM-DD)"
    if pa.types.is_timestamp(target):
        return "a date-time (YYYY-MM-DD HH:MM:SS, no time zone)"
    return f"a {target} value"


def convert(values: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """``values`` as ``target``; raises an Arrow error at the first value it cannot read."""
    if pa.types.is_string(target):
        return values if pa.types.is_string(values.type) else pc.cast(values, target)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = _normalised_text(values, target)
    if pa.types.is_date(target) and pa.types.is_timestamp(values.type):
        return pc.cast(values, target, safe=False)  # a date-time's date part, as for text
    return pc.cast(values, target, safe=True)


def first_bad_row(values: pa.ChunkedArray, target: pa.DataType) -> int:
    """The index of the first value ``convert`` cannot read (``values`` must fail as a whole)."""
    low, high = 0, len(values)  # the first failure lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        try:
            convert(values.slice(low, middle - low), target)
        except _CAST_ERRORS:
            high = middle
        else:
            low = middle
    return low


def _normalised_text(values: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    text = pc.utf8_trim_whitespace(values)
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)
    if pa.types.is_integer(target):
        return pc.replace_substring_regex(text, r"^([+-]?[0-9]+)\.0*$", r"\1")
    if pa.types.is_date(target):
        text = pc.replace_substring_regex(text, r"^([0-9]{4})([0-9]{2})([0-9]{2})$", r"\1-\2-\3")
        return pc.replace_substring_regex(text, r"^([0-9]{4}-[0-9]{2}-[0-9]{2})[ T].*$", r"\1")
    return text

