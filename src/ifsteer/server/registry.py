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
            "source": self.source, "instruction_id": v.instruction_id, "layer": v.layer,
            "mode": self.steering.effective_mode, "weight": self.steering.effective_weight,
        }
        if self.steering.positions != "all":  # shown only where the request narrowed it
            described["positions"] = self.steering.positions
        return described


def natural_weight(vector: SteeringVector, mode: Mode) -> float:
    """The vector's own weight in its own mode; otherwise that mode's default weight."""
    if mode == vector.mode:
        return vector.weight
    return vector.norm if mode == "additive" else 1.0


@dataclass
class VectorStore:
    """Named vectors loaded at start, plus instructions extracted on request (an LRU cache)."""

    named: Mapping[str, NamedVector]
    engine: Engine
    allow_transfer: bool = False
    cache_size: int = 64
    _cache: OrderedDict[tuple[str, str, int], SteeringVector] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _pending: dict[tuple[str, str, int], asyncio.Future[SteeringVector]] = field(
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
        vector.check_fits(
            e.model_id, e.hidden_size, e.n_layers, allow_transfer=self.allow_transfer
        )

    async def resolve(self, specs: Sequence[SteeringSpec], limits: Limits) -> list[Resolved]:
        if len(specs) > limits.max_steering:
            raise ApiError(
                f"{len(specs)} steering entries, the limit is {limits.max_steering}",
                param="steering",
            )
        resolved = []
        for i, spec in enumerate(specs):
            param = f"steering.{i}"
            if spec.weight is not None and abs(spec.weight) > limits.max_abs_weight:
                raise ApiError(
                    f"{param}.weight: |{spec.weight}| is over the limit {limits.max_abs_weight}",
                    param=f"{param}.weight", code="invalid_value",
                )
            vector = await self._vector(spec, param, limits)
            try:
                self._check(vector)
            except VectorMismatch as exc:
                raise ApiError(str(exc), param=param, code="vector_mismatch", status=422) from None
            mode: Mode = spec.mode or vector.mode
            weight = natural_weight(vector, mode) if spec.weight is None else spec.weight
            steering = Steering(vector, mode=mode, weight=weight, positions=spec.positions)
            resolved.append(Resolved(steering, spec.source()))
        return resolved

    async def _vector(self, spec: SteeringSpec, param: str, limits: Limits) -> SteeringVector:
        if spec.vector is not None:
            named = self.named.get(spec.vector)
            if named is None:
                known = ", ".join(sorted(self.named)) or "none"
                raise UnknownVector(
                    f"no vector named {spec.vector!r}; loaded: {known} (GET /v1/vectors)",
                    param=f"{param}.vector", code="vector_not_found",
                )
            if spec.layer is None:
                return named.default
            if spec.layer not in named.layers:
                raise ApiError(
                    f"vector {spec.vector!r} holds layers {sorted(named.layers)}, not "
                    f"{spec.layer}", param=f"{param}.layer", code="vector_mismatch", status=422,
                )
            return named.layers[spec.layer]
        return await self._extracted(spec, param, limits)

    async def _extracted(self, spec: SteeringSpec, param: str, limits: Limits) -> SteeringVector:
        layer = default_layer(self.engine.n_layers) if spec.layer is None else spec.layer
        if not 0 <= layer < self.engine.n_layers:
            raise ApiError(
                f"layer {layer} is out of range 0..{self.engine.n_layers - 1}",
                param=f"{param}.layer", code="invalid_value", status=422,
            )
        if spec.instruction is not None:
            text = spec.instruction.strip()
            if len(text) > limits.max_instruction_chars:
                raise ApiError(
                    f"instruction has {len(text)} characters, the limit is "
                    f"{limits.max_instruction_chars}", param=f"{param}.instruction",
                )
            key = ("text", text, layer)
        else:
            key = ("id", str(spec.instruction_id), layer)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key in self._pending:  # the same instruction is being extracted for another request
            return await asyncio.shield(self._pending[key])
        instruction = (
            custom_instruction(key[1]) if key[0] == "text" else get_instruction(key[1])
        )
        future: asyncio.Future[SteeringVector] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            vector = await self.engine.extract(instruction, layer)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._pending[key]
        future.set_result(vector)
        self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vector

    def listing(self) -> list[dict[str, Any]]:
        """What GET /v1/vectors shows: every named vector, then cached inline ones."""
        rows = []
        for name, named in sorted(self.named.items()):
            info = _listed(named.default, self.fits(named.default))
            rows.append({"id": name, "source": "file", "layers": sorted(named.layers), **info})
        for (kind, text, _layer), vector in self._cache.items():
            source = "instruction" if kind == "text" else "instruction_id"
            rows.append({"id": f"{source}:{text}", "source": "inline", **_listed(vector, True)})
        return rows


def _listed(vector: SteeringVector, fits: bool) -> dict[str, Any]:
    info = describe(vector)
    keep = ("instruction", "instruction_id", "model_id", "layer", "mode", "weight", "norm",
            "target", "hidden_size", "n_pairs")
    return {"object": "steering_vector", **{k: info[k] for k in keep}, "fits_model": fits}
