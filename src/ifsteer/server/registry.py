"""Steering resolution: a request's `steering` entries to the `Steering`s an engine applies.

Vectors come from two places: files loaded by name when the server starts (`--vectors DIR`),
and instructions given inline, extracted by the engine on first use and kept in an LRU cache,
so a burst of requests naming one new instruction costs one extraction.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ifsteer.backends import Engine
from ifsteer.errors import MalformedVectorFile, VectorMismatch
from ifsteer.instructions import Mode, custom_instruction, get_instruction
from ifsteer.steering import Steering
from ifsteer.vectors import SteeringVector, default_layer, describe, load_vectors

from .schema import ApiError, Limits, SteeringSpec, UnknownVector


@dataclass(frozen=True)
class NamedVector:
    """A vector loaded by name: its default layer and every layer its file holds."""

    default: SteeringVector
    layers: Mapping[int, SteeringVector]

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
        vectors, default = load_vectors(path)
        named[path.stem] = NamedVector(vectors[default], vectors)
    return named


@dataclass(frozen=True)
class Resolved:
    """A steering entry turned into what `steer` applies, with where it came from."""

    steering: Steering
    source: str

    def describe(self) -> dict[str, Any]:
        v = self.steering.vector
        described: dict[str, Any] = {
            "source": self.source,
            "instruction_id": v.instruction_id,
            "layer": v.layer,
            "mode": self.steering.effective_mode,
            "weight": self.steering.effective_weight,
        }
        if self.steering.positions != "all":  # shown only where the request narrowed it
            described["positions"] = self.steering.positions
        return described


def natural_weight(vector: SteeringVector, mode: Mode) -> float:
    """The vector's own weight in its own mode; otherwise that mode's default weight."""
    if mode == vector.mode:
        return vector.weight
    return vector.norm if mode == "additive" else 1.0


# ("text", instruction text, layer) or ("id", catalogue id, layer)
_Key = tuple[str, str, int]


@dataclass
class VectorStore:
    """Named vectors loaded at start, plus instructions extracted on request (an LRU cache)."""

    named: Mapping[str, NamedVector]
    engine: Engine
    allow_transfer: bool = False
    cache_size: int = 64
    _cache: OrderedDict[_Key, SteeringVector] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _pending: dict[_Key, asyncio.Future[SteeringVector]] = field(
        default_factory=dict, init=False, repr=False
    )

    def fits(self, vector: SteeringVector) -> bool:
        try:
            self._check(vector)
        except VectorMismatch:
            return False
        return True

    def _check(self, vector: SteeringVector) -> None:
        e = self.engine
        vector.check_fits(e.model_id, e.hidden_size, e.n_layers, allow_transfer=self.allow_transfer)

    async def resolve(self, specs: Sequence[SteeringSpec], limits: Limits) -> list[Resolved]:
        if len(specs) > limits.max_steering:
            raise ApiError(
                f"{len(specs)} steering entries, the limit is {limits.max_steering}",
                param="steering",
            )
        keys = [self._key(spec, f"steering.{i}", limits) for i, spec in enumerate(specs)]
        self._admit_extractions([k for k in keys if k is not None], limits)
        resolved = []
        for i, (spec, key) in enumerate(zip(specs, keys, strict=True)):
            param = f"steering.{i}"
            if spec.weight is not None and abs(spec.weight) > limits.max_abs_weight:
                raise ApiError(
                    f"{param}.weight: |{spec.weight}| is over the limit {limits.max_abs_weight}",
                    param=f"{param}.weight",
                    code="invalid_value",
                )
            vector = self._named(spec, param) if key is None else await self._extracted(key)
            try:
                self._check(vector)
            except VectorMismatch as exc:
                raise ApiError(str(exc), param=param, code="vector_mismatch", status=422) from None
            mode: Mode = spec.mode or vector.mode
            weight = natural_weight(vector, mode) if spec.weight is None else spec.weight
            steering = Steering(vector, mode=mode, weight=weight, positions=spec.positions)
            resolved.append(Resolved(steering, spec.source()))
        return resolved

    def _named(self, spec: SteeringSpec, param: str) -> SteeringVector:
        named = self.named.get(str(spec.vector))
        if named is None:
            known = ", ".join(sorted(self.named)) or "none"
            raise UnknownVector(
                f"no vector named {spec.vector!r}; loaded: {known} (GET /v1/vectors)",
                param=f"{param}.vector",
                code="vector_not_found",
            )
        if spec.layer is None:
            return named.default
        if spec.layer not in named.layers:
            raise ApiError(
                f"vector {spec.vector!r} holds layers {sorted(named.layers)}, not {spec.layer}",
                param=f"{param}.layer",
                code="vector_mismatch",
                status=422,
            )
        return named.layers[spec.layer]

    def _key(self, spec: SteeringSpec, param: str, limits: Limits) -> _Key | None:
        """What an inline entry is cached under (None for a named vector), checked in full
        (the catalogue id included) before any extraction starts."""
        if spec.vector is not None:
            return None
        layer = default_layer(self.engine.n_layers) if spec.layer is None else spec.layer
        if not 0 <= layer < self.engine.n_layers:
            raise ApiError(
                f"layer {layer} is out of range 0..{self.engine.n_layers - 1}",
                param=f"{param}.layer",
                code="invalid_value",
                status=422,
            )
        if spec.instruction is None:
            get_instruction(str(spec.instruction_id))  # an unknown id is a 404 here
            return ("id", str(spec.instruction_id), layer)
        text = spec.instruction.strip()
        if len(text) > limits.max_instruction_chars:
            raise ApiError(
                f"instruction has {len(text)} characters, the limit is "
                f"{limits.max_instruction_chars}",
                param=f"{param}.instruction",
            )
        return ("text", text, layer)

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

    async def _extracted(self, key: _Key) -> SteeringVector:
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

    async def _extract(self, key: _Key) -> SteeringVector:
        kind, text, layer = key
        instruction = custom_instruction(text) if kind == "text" else get_instruction(text)
        vector = await self.engine.extract(instruction, layer)
        self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vector

    def listing(self) -> list[dict[str, Any]]:
        """What GET /v1/vectors shows: every named vector, then catalogue instructions
        extracted inline, one row per id with its layers. Free-text instructions are
        another client's words: they are not listed."""
        rows = []
        for name, named in sorted(self.named.items()):
            info = _listed(named.default, self.fits(named.default))
            rows.append({"id": name, "source": "file", "layers": sorted(named.layers), **info})
        by_id: dict[str, list[SteeringVector]] = {}
        for (kind, text, _layer), vector in self._cache.items():
            if kind == "id":
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
