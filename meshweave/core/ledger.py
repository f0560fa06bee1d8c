"""Counting of the project's own collective and point-to-point traffic.

A `CommLedger` records, per (group name, operation), how many calls were made and how many
payload bytes this rank put into them. "Payload bytes" is always the size of the tensor this
rank hands to the call (for a receive, the size of the buffer it receives into), so that tests
and benchmarks can compare it with analytic formulas written in the same terms.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class OpStats:
    calls: int = 0
    bytes: int = 0


@dataclass
class CommLedger:
    """Per-rank tally of calls and payload bytes, keyed by (group name, op name)."""

    enabled: bool = True
    stats: dict[tuple[str, str], OpStats] = field(default_factory=lambda: defaultdict(OpStats))

    def record(self, group: str, op: str, nbytes: int) -> None:
        if not self.enabled:
            return
        entry = self.stats[(group, op)]
        entry.calls += 1
        entry.bytes += int(nbytes)

    def reset(self) -> None:
        self.stats.clear()

    def calls(self, group: str | None = None, op: str | None = None) -> int:
        return sum(s.calls for (g, o), s in self.stats.items() if _match(g, o, group, op))

    def bytes(self, group: str | None = None, op: str | None = None) -> int:
        return sum(s.bytes for (g, o), s in self.stats.items() if _match(g, o, group, op))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Plain-dict copy, e.g. for JSON metrics: {"sp/all_to_all": {"calls": 4, "bytes": 4096}}."""
        return {f"{g}/{o}": {"calls": s.calls, "bytes": s.bytes} for (g, o), s in sorted(self.stats.items())}


def _match(g: str, o: str, group: str | None, op: str | None) -> bool:
    return (group is None or g == group) and (op is None or o == op)
