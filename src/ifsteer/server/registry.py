"""Steering resolution: a request's `steering` entries to the `Steering`s a backend applies.

Vectors come from three places: files loaded by name when the server starts (`--vectors DIR`);
the calibrated points of the served model (`ifsteer.shipped.points`, the resolver the CLI uses
too): an `instruction_id` with no `layer` steers at its shipped point, or at its group's point
(extracted once, cached on disk, labelled unverified); and instructions given inline, extracted
by the backend on first use and kept in an LRU cache, so a burst of requests naming one new
instruction costs one extraction. Each response's `steering` echo says which it was.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ifsteer.backends import Backend
from ifsteer.errors import MalformedVectorFile, VectorMismatch
from ifsteer.instructions import custom_instruction
from ifsteer.shipped import ShippedVector, calibrated, is_calibrated, listing
from ifsteer.shipped.points import GroupPoint, Points, instruction_for
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, default_layer, describe, read_vector_file

from .resolved import EXTRACTED, Resolved, kind_of, overridden, point_echo
from .schema import ApiError, Limits, SteeringSpec, UnknownVector


@dataclass(frozen=True)
class NamedVector:
    """A vector loaded by name: its default layer and every layer its file holds, and its
    point where the file is calibrated (applied when the request names no layer)."""

    default: SteeringVector
    layers: Mapping[int, SteeringVector]
    point: ShippedVector | None = None

    @classmethod
    def single(cls, vector: SteeringVector) -> NamedVector:
        return cls(vector, {vector.layer: vector})


def load_vector_dir(directory: str | Path) -> dict[str, NamedVector]:
    """Every `*.safetensors` vector file in a directory, named by its file stem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MalformedVectorFile(f"{directory}: no such vector directory")
    named = {}
    for path in sorted(directory.glob("*.safetensors")):
        file = read_vector_file(path)
        point = calibrated(file) if is_calibrated(file) else None
        named[path.stem] = NamedVector(file.default, dict(file.layers), point)
    return named


# ("text", instruction text, layer), ("id", catalogue id, layer), or ("group", id, -1): an id
# with no file, extracted at its group's point's layers
_Key = tuple[str, str, int]
_Extracted = SteeringVector | ShippedVector


@dataclass
class VectorStore:
    """Named vectors loaded at start, the model's calibrated points (`points`; None: the
    package's for the served model), and instructions extracted on request (an LRU cache)."""

    named: Mapping[str, NamedVector]
    backend: Backend
    allow_transfer: bool = False
    cache_size: int = 64
    points: Points | None = None
    _cache: OrderedDict[_Key, _Extracted] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _pending: dict[_Key, asyncio.Future[_Extracted]] = field(
        default_factory=dict, init=False, repr=False
    )
    _known: OrderedDict[str, ShippedVector] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _shipped_rows: list[dict[str, Any]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.points is None:
            self.points = Points(self.backend.model_id)

    def fits(self, vector: SteeringVector) -> bool:
        try:
            self._check(vector)
        except VectorMismatch:
            return False
        return True

    def _check(self, vector: SteeringVector) -> None:
        e = self.backend
        vector.check_fits(e.model_id, e.hidden_size, e.n_layers, allow_transfer=self.allow_transfer)

    async def resolve(self, specs: Sequence[SteeringSpec], limits: Limits) -> list[Resolved]:
        if len(specs) > limits.max_steering:
            raise ApiError(
                f"{len(specs)} steering entries, the limit is {limits.max_steering}",
                param="steering",
            )
        plans = [self._plan(spec, f"steering.{i}", limits) for i, spec in enumerate(specs)]
        self._admit_extractions([p for p in plans if isinstance(p, tuple)], limits)
        resolved = []
        for i, (spec, plan) in enumerate(zip(specs, plans, strict=True)):
            param = f"steering.{i}"
            if spec.weight is not None and abs(spec.weight) > limits.max_abs_weight:
                raise ApiError(
                    f"{param}.weight: |{spec.weight}| is over the limit {limits.max_abs_weight}",
                    param=f"{param}.weight",
                    code="invalid_value",
                )
            found = await self._extracted(plan) if isinstance(plan, tuple) else plan
            echo: Mapping[str, Any] | None = None
            if isinstance(found, ShippedVector):
                base = found.steerings()
                echo = point_echo(found, "file" if spec.vector is not None else kind_of(found))
            else:
                base = [Steering(found)]
                echo = EXTRACTED if isinstance(plan, tuple) else None
            for steering in base:
                try:
                    self._check(steering.vector)
                except VectorMismatch as exc:
                    raise ApiError(
                        str(exc), param=param, code="vector_mismatch", status=422
                    ) from None
            steerings = tuple(overridden(s, spec) for s in base)
            resolved.append(Resolved(steerings, spec.source(), echo))
        return resolved

    def _plan(
        self, spec: SteeringSpec, param: str, limits: Limits
    ) -> _Key | ShippedVector | SteeringVector:
        """What an entry steers with, or the key of the extraction it needs, checked in full
        (the catalogue id and the instruction's length included) before any extraction."""
        if spec.vector is not None:
            return self._named(spec, param)
        if spec.instruction_id is not None and spec.layer is None:
            point = self._point(str(spec.instruction_id))
            if isinstance(point, GroupPoint):
                return ("group", point.instruction.id, -1)
            if point is not None:
                return point
        layer = default_layer(self.backend.n_layers) if spec.layer is None else spec.layer
        if not 0 <= layer < self.backend.n_layers:
            raise ApiError(
                f"layer {layer} is out of range 0..{self.backend.n_layers - 1}",
                param=f"{param}.layer",
                code="invalid_value",
                status=422,
            )
        if spec.instruction is None:
            instruction_for(str(spec.instruction_id))  # an unknown id is a 404 here
            return ("id", str(spec.instruction_id), layer)
        text = spec.instruction.strip()
        if len(text) > limits.max_instruction_chars:
            raise ApiError(
                f"instruction has {len(text)} characters, the limit is "
                f"{limits.max_instruction_chars}",
                param=f"{param}.instruction",
            )
        # Extraction reads every pair with the instruction in it: its cost is in tokens.
        tokens = len(self.backend.tokenizer(text, add_special_tokens=False).input_ids)
        if tokens > limits.max_instruction_tokens:
            raise ApiError(
                f"instruction has {tokens} tokens, the limit is {limits.max_instruction_tokens}",
                param=f"{param}.instruction",
            )
        return ("text", text, layer)

    def _point(self, instruction_id: str) -> ShippedVector | GroupPoint | None:
        """The id's calibrated point: shipped, or its group's (made here or cached on disk)."""
        known = self._known.get(instruction_id)
        if known is not None:
            self._known.move_to_end(instruction_id)
            return known
        assert self.points is not None
        found = self.points.lookup(instruction_id)
        if isinstance(found, ShippedVector):
            self._remember(instruction_id, found)
        return found

    def _remember(self, instruction_id: str, point: ShippedVector) -> None:
        self._known[instruction_id] = point
        while len(self._known) > 4 * self.cache_size:
            self._known.popitem(last=False)

    async def _group_point(self, instruction_id: str) -> ShippedVector:
        """Extract the id at its group's layers (one backend extraction per layer), then write
        the point to the cache, where the CLI and the next server find it."""
        assert self.points is not None
        group = self.points.lookup(instruction_id)
        if isinstance(group, GroupPoint):
            vectors = {at: await self.backend.extract(group.instruction, at) for at in group.layers}
            group = await asyncio.to_thread(group.save, vectors)
        assert isinstance(group, ShippedVector)  # the id's group has a point (`_plan`)
        self._remember(instruction_id, group)
        return group

    def _named(self, spec: SteeringSpec, param: str) -> SteeringVector | ShippedVector:
        named = self.named.get(str(spec.vector))
        if named is None:
            known = ", ".join(sorted(self.named)) or "none"
            raise UnknownVector(
                f"no vector named {spec.vector!r}; loaded: {known} (GET /v1/vectors)",
                param=f"{param}.vector",
                code="vector_not_found",
            )
        if spec.layer is None:
            return named.default if named.point is None else named.point
        if spec.layer not in named.layers:
            raise ApiError(
                f"vector {spec.vector!r} holds layers {sorted(named.layers)}, not {spec.layer}",
                param=f"{param}.layer",
                code="vector_mismatch",
                status=422,
            )
        return named.layers[spec.layer]

    def _admit_extractions(self, keys: Sequence[_Key], limits: Limits) -> None:
        """Each new (instruction, layer) is a forward pass over every prompt pair: a request
        may start `max_new_extractions`, the server runs `max_pending_extractions` at once."""
        new = {k for k in keys if k not in self._cache and k not in self._pending}
        if len(new) > limits.max_new_extractions:
            raise ApiError(
                f"this request needs {len(new)} new inline extractions, the limit is "
                f"{limits.max_new_extractions} per request; send them one request at a time "
                "(each is cached) or extract them up front (ifsteer extract, --vectors)",
                param="steering",
                code="too_many_extractions",
            )
        if new and len(self._pending) + len(new) > limits.max_pending_extractions:
            raise ApiError(
                f"{len(self._pending)} inline extractions are running or waiting, the limit "
                f"is {limits.max_pending_extractions}; retry shortly",
                param="steering",
                code="server_busy",
                status=429,
            )

    async def _extracted(self, key: _Key) -> _Extracted:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        task = self._pending.get(key)
        if task is None:
            # Its own task: it finishes (and is cached) even if the asking client leaves.
            task = asyncio.ensure_future(self._extract(key))
            self._pending[key] = task
            task.add_done_callback(lambda t: self._pending.pop(key, None))
        return await asyncio.shield(task)

    async def _extract(self, key: _Key) -> _Extracted:
        kind, text, layer = key
        vector: _Extracted
        if kind == "group":
            vector = await self._group_point(text)
        else:
            instruction = custom_instruction(text) if kind == "text" else instruction_for(text)
            vector = await self.backend.extract(instruction, layer)
        self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vector

    def listing(self) -> list[dict[str, Any]]:
        """What GET /v1/vectors shows: every named vector, the served model's shipped points
        with their validation scores, the group points made for it (unverified), then catalogue
        instructions extracted inline, one row per id with its layers. Free-text instructions
        are another client's words: they are not listed."""
        rows = []
        for name, named in sorted(self.named.items()):
            info = _listed(named.default, self.fits(named.default))
            rows.append({"id": name, "source": "file", "layers": sorted(named.layers), **info})
        rows += self._point_rows()
        by_id: dict[str, list[SteeringVector]] = {}
        for (kind, text, _layer), vector in self._cache.items():
            if kind == "id" and isinstance(vector, SteeringVector):
                by_id.setdefault(text, []).append(vector)
        for text, vectors in sorted(by_id.items()):
            rows.append(
                {
                    "id": f"instruction_id:{text}",
                    "source": "inline",
                    "layers": sorted(v.layer for v in vectors),
                    **_listed(vectors[-1], True),
                }
            )
        return rows

    def _point_rows(self) -> list[dict[str, Any]]:
        """Shipped points are read once (the package does not change while serving); group
        points are read from the cache each time, since another process may add one."""
        assert self.points is not None
        if self._shipped_rows is None:
            folder = self.points.shipped_folder
            self._shipped_rows = [
                {"id": f"instruction_id:{row['instruction_id']}", "source": "shipped", **row}
                for row in listing(self.backend.model_id, folder)
            ]
        groups = [
            {
                "id": f"instruction_id:{point.instruction_id}",
                "source": "group",
                "instruction_id": point.instruction_id,
                **point.describe(),
            }
            for point in self.points.cached()
        ]
        return [*self._shipped_rows, *groups]


def _listed(vector: SteeringVector, fits: bool) -> dict[str, Any]:
    info = describe(vector)
    keep = (
        "instruction",
        "instruction_id",
        "model_id",
        "layer",
        "mode",
        "weight",
        "norm",
        "target",
        "hidden_size",
        "n_pairs",
    )
    return {"object": "steering_vector", **{k: info[k] for k in keep}, "fits_model": fits}
