"""What a resolution is: a power of two from 4 (4, 8, ..., 1024); and the list of them up to one.

The networks grow through these sizes, the datasets store one level per size and the schedule
has phases at each. Imports nothing, so every folder of the package (and the tools) may use it.
"""

from __future__ import annotations

MIN_RESOLUTION = 4  # where growth starts and the smallest level a dataset stores


def is_resolution(n: object) -> bool:
    """Whether ``n`` is an int power of two >= 4 (a bool is not)."""
    return (isinstance(n, int) and not isinstance(n, bool) and n >= MIN_RESOLUTION
            and n & (n - 1) == 0)


def resolutions(max_resolution: int) -> list[int]:
    """``[4, 8, ..., max_resolution]``; ValueError unless ``max_resolution`` is a resolution."""
    if not is_resolution(max_resolution):
        raise ValueError(f"resolution must be a power of two >= 4, got {max_resolution!r}")
    return [1 << k for k in range(2, max_resolution.bit_length())]  # 2**2 = 4, ..., max
