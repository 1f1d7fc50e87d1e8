"""Small formulas of semoe that every Python tool shares (torch-free), so that the references,
the golden generators and the benchmarks compute them one way.

capacity_of: the expert capacity of a group of S tokens (`MoeConfig::capacity` in Rust),
evaluated exactly as ``math.ceil(k * capacity_factor * S / E)`` (left to right in float64), then
clamped below by min_capacity; None when dropless.
"""

from __future__ import annotations

import math


def capacity_of(S: int, E: int, k: int, capacity_factor: float, min_capacity: int,
                dropless: bool = False) -> int | None:
    if dropless:
        return None
    return max(math.ceil(k * capacity_factor * S / E), min_capacity)
