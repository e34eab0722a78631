"""Rows set aside: validation rows for the sweeps, the rest for evaluation, never overlapping.

The paper's pipeline calibrates on some rows and reports on the others; a split must be the
same on every machine and for any order of the input, so rows are ranked by a seeded hash of
their key, not shuffled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ifsteer.errors import InvalidSteering
from ifsteer.rows import Row, by_group

__all__ = ["Split", "held_out_split", "split_rows"]


def _rank(seed: int, key: object) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


@dataclass(frozen=True)
class Split:
    """Validation rows per group (for sweeps) and the evaluation rows, never overlapping.

    `evaluation` interleaves the groups round-robin, so its first N rows cover every
    instruction about equally: `--limit N` takes a prefix, and a larger limit extends it.
    """

    validation: dict[str, list[Row]]
    evaluation: list[Row]
    per_group: int
    seed: int
    rule: str = (
        "per instruction, rows ranked by sha256(seed:key); the first min(per_group, n // 2) "
        "preferring distinct vectors go to validation, the rest to evaluation (interleaved "
        "round-robin across instructions)"
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "per_group": self.per_group,
            "seed": self.seed,
            "rule": self.rule,
            "validation": {g: [r.key for r in rows] for g, rows in self.validation.items()},
            "evaluation": [r.key for r in self.evaluation],
        }


def split_rows(rows: Sequence[Row], per_group: int, *, seed: int = 0) -> Split:
    """Set aside up to `per_group` rows of each instruction for its sweep (never more than half
    of that instruction's rows), the rest for evaluation. Same rows and seed, same split.

    Within the language group, distinct languages are preferred, so a sweep sees several.
    """
    if per_group < 0:
        raise InvalidSteering(f"per_group must be at least 0, got {per_group}")
    groups = by_group(rows)
    validation: dict[str, list[Row]] = {}
    rest: dict[str, list[Row]] = {}
    for group, members in sorted(groups.items()):
        ranked = sorted(members, key=lambda r: _rank(seed, r.key))
        take = min(per_group, len(ranked) // 2)
        chosen: list[Row] = []
        seen: set[tuple[str, ...]] = set()
        for row in ranked:  # first pass: one row per distinct vector set
            ids = tuple(row.vector_ids())
            if len(chosen) < take and ids not in seen:
                chosen.append(row)
                seen.add(ids)
        for row in ranked:  # then fill up in rank order
            if len(chosen) < take and row not in chosen:
                chosen.append(row)
        if chosen:
            validation[group] = chosen
        rest[group] = [r for r in ranked if r not in chosen]
    return Split(validation, _interleave(rest), per_group, seed)


def held_out_split(
    rows: Sequence[Row], validation: dict[str, list[Row]], *, per_group: int, seed: int = 0
) -> Split:
    """Every row held out for evaluation; the sweeps validate on rows made elsewhere
    (`ifsteer.validation.validation_rows`, from our own queries)."""
    groups = by_group(rows)
    ranked = {g: sorted(m, key=lambda r: _rank(seed, r.key)) for g, m in sorted(groups.items())}
    rule = (
        "validation rows built from our own base queries (ifsteer.validation), per_group "
        "per instruction; every data row held out for evaluation, ranked by "
        "sha256(seed:key) and interleaved round-robin across instructions"
    )
    return Split(validation, _interleave(ranked), per_group, seed, rule)


def _interleave(groups: dict[str, list[Row]]) -> list[Row]:
    """Rows of every group in turn, so a prefix covers every instruction about equally."""
    evaluation: list[Row] = []
    depth = max((len(v) for v in groups.values()), default=0)
    for i in range(depth):
        evaluation.extend(members[i] for members in groups.values() if i < len(members))
    return evaluation
