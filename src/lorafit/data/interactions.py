"""User-item interactions as records {"user": ..., "item": ..., "rating": ... (optional)}: the
`interaction` format a recommender trains on (MovieLens' ratings.csv with data.columns
{userId: user, movieId: item, rating: rating}). Ids are kept as strings, so "7" in a CSV and 7 in
a JSONL file are the same user."""

from __future__ import annotations

import math

from lorafit.data.formats import Format, register_format


def rating_of(record: dict) -> float:
    """The record's rating as a float; NaN when it has none (an implicit interaction)."""
    value = record.get("rating")
    if value is None or value == "":
        return math.nan
    return float(value)


def _check_interaction(record: dict) -> None:
    for key in ("user", "item"):
        value = record.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"field {key!r} must be an id (a string or an integer), got {value!r}")
        if not str(value).strip():
            raise ValueError(f"empty required field {key!r}")
    try:
        rating = rating_of(record)
    except (TypeError, ValueError):
        raise ValueError(f"field 'rating' must be a number, got {record.get('rating')!r}") from None
    if math.isinf(rating):
        raise ValueError("field 'rating' must be finite")


register_format(
    Format(
        "interaction",
        '{"user": "42", "item": "318", "rating": 4.5}',
        ("user", "item"),
        _check_interaction,
        kind="interaction",
    )
)
