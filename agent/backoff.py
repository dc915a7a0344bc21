"""Capped exponential backoff with jitter, for every retry loop of the agent."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, first_s: float, cap_s: float, low: float = 0.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, …): ``first_s`` doubling per
    attempt up to ``cap_s``, then a random share of it between ``low`` and 1.

    Jitter keeps devices that lost the same server together from returning together.
    """
    delay = min(cap_s, first_s * 2.0 ** min(max(attempt - 1, 0), 60))  # no float overflow
    return random.uniform(low, 1.0) * delay
