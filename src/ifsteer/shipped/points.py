"""An instruction id to the calibrated point a face steers with; the CLI and the server share it.

Three answers, in this order (docs/shipped.md, "Which point an id gets"):

1. the file that ships for the model (`ifsteer.shipped`), applied as it records itself
   (`ShippedVector.steerings`: its layers, per-layer weights and positions);
2. an id with no file, in a group that has a calibrated point (a language, a keyword): the
   group's point (layers, mode, scale, positions of the group's donor file, German's for the
   languages) applied to the id's own vector, extracted once at those layers and cached under
   `$IFSTEER_HOME/points/<model>/` as a calibrated file with status `unverified`: no validation
   ran for this id, so every face says so;
3. nothing: the caller extracts at its default layer, uncalibrated, or refuses.

Extraction itself stays with the caller (the CLI extracts on its loaded model, the server on
its engine's worker, a piece at a time), so this module only says what to extract and turns
the extracted vectors into the point.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ifsteer.instructions import Instruction, get_instruction, language_instruction
from ifsteer.models import LoadedModel
from ifsteer.paths import cache_home
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, extract_instruction
from ifsteer.vectors.records import point_record

from . import (
    NotShipped,
    ShippedVector,
    file_name,
    read_calibrated,
    shipped_dir,
    shipped_ids,
    write_calibrated,
)

__all__ = ["GROUP_DONORS", "GroupPoint", "Points", "extract_point", "instruction_for"]

_LANGUAGE = "language:response_language:"
# Group (id prefix) → the file whose search chose the group's point; None: the first file of
# the group that was searched (every keyword file holds the keyword class's point).
GROUP_DONORS: dict[str, str | None] = {
    _LANGUAGE: _LANGUAGE + "de",  # `--quick` verified German's point on the other languages
    "keywords:existence:": None,
}
# Languages IFEval's checker knows that the catalogue (`instructions.LANGUAGES`) does not: no
# file ships for them, so they are served by the language group's point.
IFEVAL_LANGUAGES = {
    "bg": "Bulgarian",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "ja": "Japanese",
    "ml": "Malayalam",
    "pl": "Polish",
    "ta": "Tamil",
    "uk": "Ukrainian",
}


def instruction_for(instruction_id: str) -> Instruction:
    """The catalogue's instruction, or one for a language IFEval checks and the catalogue lacks
    (`UnknownInstruction` otherwise)."""
    code = instruction_id.removeprefix(_LANGUAGE)
    if instruction_id.startswith(_LANGUAGE) and code in IFEVAL_LANGUAGES:
        return language_instruction(code, IFEVAL_LANGUAGES[code])
    return get_instruction(instruction_id)


@dataclass(frozen=True)
class GroupPoint:
    """A group's calibrated point for an id with no file: extract `instruction` at `layers`,
    then `save` the vectors as the id's point (cached at `path`)."""

    instruction: Instruction
    donor: ShippedVector
    path: Path

    @property
    def layers(self) -> tuple[int, ...]:
        return self.donor.layers

    def steerings(self, vectors: Mapping[int, SteeringVector]) -> list[Steering]:
        """The donor's point on these vectors: a projection keeps the donor's target scale
        (c̄ + (s−1)·‖u‖), an additive weight keeps its size in units of ‖u‖, per layer."""
        applied = []
        for d, weight in zip(self.donor.vectors, self.donor.weights, strict=True):
            v = vectors[d.layer]
            if d.mode == "projection":
                v = replace(v, target=v.target + (self._scale(d) - 1.0) * v.norm)
            else:
                weight = weight / d.norm * v.norm
            applied.append(
                Steering(v, mode=d.mode, weight=weight, positions=self.donor.positions)  # type: ignore[arg-type]
            )
        return applied

    def _scale(self, donor: SteeringVector) -> float:
        paper = self.donor.calibration.paper_target(donor.layer)
        if paper is None:
            scale = self.donor.calibration.scale
            return 1.0 if scale is None else scale
        return 1.0 + (donor.target - paper) / donor.norm

    def save(self, vectors: Mapping[int, SteeringVector]) -> ShippedVector:
        """Write the id's point where `Points` finds it next time, and read it back."""
        calibration = self.donor.calibration
        record = point_record(
            status="unverified",
            recommended=False,
            method="mean_difference",
            point=calibration.point,
            mode=self.donor.vectors[0].mode,
            scale=calibration.scale,
            validation=None,
            paper_targets={layer: vectors[layer].target for layer in self.layers},
            group={
                "donor": self.donor.instruction_id,
                "point": calibration.point,
                "donor_validation": calibration.validation or None,
            },
        )
        try:
            write_calibrated(self.path, self.steerings(vectors), record)
        except FileNotFoundError:  # another process (CLI, server) wrote the same point first
            if not self.path.is_file():
                raise
        return read_calibrated(self.path)


@dataclass
class Points:
    """Where one model's calibrated points are: its shipped folder and its cache of group
    points (`directory` and `cache` default to the package's folder and `$IFSTEER_HOME`)."""

    model_id: str
    directory: Path | None = None
    cache: Path | None = None
    _donors: dict[str, ShippedVector | None] = field(default_factory=dict, init=False, repr=False)

    @property
    def shipped_folder(self) -> Path:
        return self.directory or shipped_dir(self.model_id)

    @property
    def cache_folder(self) -> Path:
        return self.cache or cache_home() / "points" / self.model_id

    def lookup(self, instruction_id: str) -> ShippedVector | GroupPoint | None:
        """The shipped point, the group's (cached, or to extract), or None."""
        return self.shipped(instruction_id) or self.group(instruction_id)

    def require(self, instruction_id: str) -> ShippedVector | GroupPoint:
        """`lookup`, or `NotShipped` where neither the id nor its group has a point."""
        found = self.lookup(instruction_id)
        if found is None:
            raise NotShipped(
                f"no calibrated vector ships for {instruction_id!r} on {self.model_id!r}, nor "
                "for its group: `ifsteer vectors list` shows those that do, `ifsteer extract` "
                "makes one"
            )
        return found

    def shipped(self, instruction_id: str) -> ShippedVector | None:
        path = self.shipped_folder / file_name(instruction_id)
        return read_calibrated(path) if path.is_file() else None

    def group(self, instruction_id: str) -> ShippedVector | GroupPoint | None:
        prefix = next((p for p in GROUP_DONORS if instruction_id.startswith(p)), None)
        donor = None if prefix is None else self._donor(prefix)
        if donor is None:
            return None
        instruction = instruction_for(instruction_id)  # a bad word or language raises here
        if instruction.id != instruction_id:  # "keywords:existence:Zebra" ships as "...zebra"
            return self.lookup(instruction.id)
        path = self.cache_folder / file_name(instruction.id)
        if path.is_file():
            cached = read_calibrated(path)
            made_from = cached.calibration.group or {}
            if made_from.get("point") == donor.calibration.point and (
                cached.layers == donor.layers
            ):
                return cached  # a rebuilt donor with another point makes it stale
        return GroupPoint(instruction, donor, path)

    def _donor(self, prefix: str) -> ShippedVector | None:
        """A searched mean-difference point of the group, a file's own or the paper's point a
        trained file keeps: a trained vector's weights mean nothing for another id's
        extracted vector."""
        if prefix not in self._donors:
            preferred = GROUP_DONORS[prefix]
            ids = shipped_ids(self.model_id, self.shipped_folder)
            candidates = [preferred] if preferred in ids else []
            candidates += [i for i in ids if i.startswith(prefix) and i != preferred]
            lent = (
                s if s.method == "mean_difference" else s.kept_point()
                for s in map(self.shipped, candidates)
                if s is not None
            )
            self._donors[prefix] = next(
                (s for s in lent if s is not None and s.status == "searched"), None
            )
        return self._donors[prefix]

    def cached(self) -> list[ShippedVector]:
        """The group points extracted on this machine for the model."""
        folder = self.cache_folder
        if not folder.is_dir():
            return []
        return [read_calibrated(p) for p in sorted(folder.glob("*.safetensors"))]


def extract_point(lm: LoadedModel, group: GroupPoint, *, n_pairs: int = 64) -> ShippedVector:
    """A group's point made on a loaded model (`generate --instruction-id`), with the pairs the
    server extracts from (our base queries, seed 0), so both cache the same vector."""
    vectors = extract_instruction(lm, group.instruction, group.layers, n_pairs=n_pairs)
    return group.save(vectors)
