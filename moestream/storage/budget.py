"""The byte budgets of the tiers as a user gives them: a size ("12GiB", 4096), "auto" or
nothing (a quarter of what is free), or a share ("50%") of what is free, checked against what is
free so that an impossible request is one line naming both, not an ENOMEM from the arena."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import BudgetError, UsageError
from ..units import format_size, parse_size

#: the share of free memory a tier takes when its budget is left out (or "auto")
DEFAULT_SHARE = 0.25


@dataclass(frozen=True)
class Budget:
    """A resolved budget: `bytes`, and how it was chosen, in words (for `generate` to print)."""
    bytes: int
    how: str


def resolve_budget(value: int | str | None, what: str, *, free: int, where: str,
                   default_share: Optional[float] = DEFAULT_SHARE) -> Budget:
    """`value` (None/"auto", "N%", or a size) as bytes of `free` (what `where` has free).
    default_share None: leaving it out means 0 (a tier that is off by default). A size larger
    than `free` is a BudgetError naming both."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text is None or text == "auto":
        if default_share is None:
            return Budget(0, "off by default")
        n = int(free * default_share)
        return Budget(n, f"{default_share:.0%} of the {format_size(free)} {where} (the default)")
    if isinstance(text, str) and text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise UsageError(f"{what}: cannot parse {value!r} as a share (e.g. 50%)") from None
        if not 0 <= share <= 1:
            raise UsageError(f"{what}: {value!r} must lie in 0%..100% of the {format_size(free)} {where}")
        return Budget(int(free * share), f"{text} of the {format_size(free)} {where}")
    n = parse_size(value, what)
    if n > free:
        raise BudgetError(f"{what} {format_size(n)} is more than the {format_size(free)} {where}; give at most "
                          "that, or a share of it (e.g. 50%)")
    return Budget(n, "as given")
