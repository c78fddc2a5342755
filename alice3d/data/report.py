"""`DataReport`: which inputs a dataset uses and which it left out (quarantined), and why."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataReport"]


@dataclass
class DataReport:
    used: int
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def summary(self) -> str:
        lines = [f"{self.used} volumes usable, {len(self.bad)} quarantined"]
        lines += [f"  {p}: {r}" for p, r in self.bad]
        return "\n".join(lines)
