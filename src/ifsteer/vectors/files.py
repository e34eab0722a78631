"""Vector files: safetensors with JSON metadata, one instruction of one model per file.

One file holds the directions of several layers and names a default layer, so a layer chosen
later (by a sweep, or `--layer`) needs no second extraction and the choice travels with the
file. `read_vector_file` reads a file once into a `VectorFile`; `load_vector_directory` reads a
directory of them, by the instruction id each stores, and callers pass those values along
rather than reading the files again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ifsteer.errors import EvaluationError, InvalidSteering, MalformedVectorFile, VectorMismatch
from ifsteer.instructions import Mode
from ifsteer.vectors.vector import SteeringVector

FORMAT_NAME = "ifsteer.vector"
FORMAT_VERSION = 1

_SHARED_FIELDS = (
    "model_id",
    "hidden_size",
    "instruction",
    "instruction_id",
    "phrasings",
    "n_pairs",
    "mode",
    "weight",
    "version",
    "extra",
)


@dataclass(frozen=True)
class VectorFile:
    """Everything one vector file holds: a vector per layer, and the layer used by default."""

    path: Path
    layers: Mapping[int, SteeringVector]
    default_layer: int

    @property
    def default(self) -> SteeringVector:
        return self.layers[self.default_layer]

    @property
    def instruction_id(self) -> str:
        return self.default.instruction_id

    def at(self, layer: int | None = None) -> SteeringVector:
        """The vector at `layer` (the default layer when None)."""
        chosen = self.default_layer if layer is None else layer
        if chosen not in self.layers:
            raise VectorMismatch(
                f"{self.path} holds layers {sorted(self.layers)}, not {chosen}; "
                "re-extract with that layer (ifsteer extract --layers)"
            )
        return self.layers[chosen]


def save_vectors(
    path: str | Path, vectors: Sequence[SteeringVector], default: int | None = None
) -> Path:
    """Write vectors of one instruction (one per layer) to one safetensors file.

    `default` is the layer `load_vector` returns when none is asked for.
    """
    if not vectors:
        raise InvalidSteering("nothing to save")
    first = vectors[0]
    for v in vectors[1:]:
        if v.instruction_id != first.instruction_id or v.hidden_size != first.hidden_size:
            raise InvalidSteering("one file holds one instruction of one model")
    default = first.layer if default is None else default
    if default not in {v.layer for v in vectors}:
        raise VectorMismatch(f"default layer {default} is not among the saved layers")
    shared = {k: v for k, v in _fields(first).items() if k in _SHARED_FIELDS}
    shared["phrasings"] = list(first.phrasings)
    shared["extra"] = dict(first.extra)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "default_layer": default,
        # Each layer keeps its own weight (a trained vector's differs per layer); the shared
        # "weight" stays for files written before, which had one for all layers.
        "layers": {
            str(v.layer): {"norm": v.norm, "target": v.target, "weight": v.weight} for v in vectors
        },
        **shared,
    }
    tensors = {
        f"layer.{v.layer}.direction": v.direction.detach().float().contiguous().cpu()
        for v in vectors
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale one would keep its own mode
    # safetensors' save_file makes owner-only files whatever the umask; written here, the file
    # gets the mode of any new file, so a server running as another user can read the vector.
    tmp.write_bytes(save(tensors, metadata={"ifsteer": json.dumps(meta)}))
    tmp.replace(path)
    return path


def _fields(vector: SteeringVector) -> dict[str, Any]:
    return {f: getattr(vector, f) for f in vector.__dataclass_fields__}


def read_vector_file(path: str | Path) -> VectorFile:
    """Read a vector file once: all its layers and its default layer."""
    path = Path(path)
    meta, tensors = _read(path)
    try:
        shared = {k: meta[k] for k in _SHARED_FIELDS}
        vectors = {
            int(layer): SteeringVector(
                direction=tensors[f"layer.{layer}.direction"],
                norm=float(info["norm"]),
                layer=int(layer),
                target=float(info["target"]),
                **{
                    **shared,
                    "phrasings": tuple(shared["phrasings"]),
                    "weight": float(info.get("weight", shared["weight"])),
                },
            )
            for layer, info in meta["layers"].items()
        }
        default = int(meta["default_layer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedVectorFile(f"{path}: metadata is incomplete ({exc})") from None
    if default not in vectors:
        raise MalformedVectorFile(f"{path}: default layer {default} has no direction")
    return VectorFile(path, vectors, default)


def load_vectors(path: str | Path) -> tuple[dict[int, SteeringVector], int]:
    """All layers in a file and its default layer (the serving backends read files this way)."""
    file = read_vector_file(path)
    return dict(file.layers), file.default_layer


def load_vector(path: str | Path, layer: int | None = None) -> SteeringVector:
    return read_vector_file(path).at(layer)


def load_vector_directory(path: str | Path) -> dict[str, VectorFile]:
    """Every `*.safetensors` vector file of a directory, by the instruction id it stores."""
    directory = Path(path)
    if not directory.is_dir():
        raise EvaluationError(f"{directory}: not a directory of vector files")
    found: dict[str, VectorFile] = {}
    for name in sorted(directory.glob("*.safetensors")):
        if name.name.startswith("."):
            continue  # a half-written file of save_vectors
        file = read_vector_file(name)  # MalformedVectorFile names the file
        if file.instruction_id in found:
            raise EvaluationError(
                f"{found[file.instruction_id].path} and {name} both hold "
                f"{file.instruction_id!r}; keep one"
            )
        found[file.instruction_id] = file
    return found


def load_vector_files(path: str | Path) -> dict[str, VectorFile]:
    """A directory of vector files, or a single file, by the instruction id each stores."""
    if Path(path).is_dir():
        return load_vector_directory(path)
    file = read_vector_file(path)
    return {file.instruction_id: file}


def update_defaults(
    path: str | Path,
    *,
    layer: int | None = None,
    weight: float | None = None,
    mode: Mode | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Record a calibrated layer/weight/mode in the file itself, so the choice travels with it."""
    file = read_vector_file(path)
    updated = [
        replace(v.with_defaults(mode=mode, weight=weight), extra={**v.extra, **(extra or {})})
        for v in file.layers.values()
    ]
    return save_vectors(path, updated, file.default_layer if layer is None else layer)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise MalformedVectorFile(f"{path}: no such vector file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ifsteer")
    except (SafetensorError, OSError, ValueError) as exc:
        raise MalformedVectorFile(f"{path}: not a safetensors file ({exc})") from None
    if raw is None:
        raise MalformedVectorFile(f"{path}: safetensors file without ifsteer metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise MalformedVectorFile(f"{path}: ifsteer metadata is not valid JSON") from None
    if meta.get("format") != FORMAT_NAME:
        raise MalformedVectorFile(f"{path}: not an ifsteer vector file")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise MalformedVectorFile(
            f"{path}: written by a newer ifsteer (format {meta['format_version']}); upgrade"
        )
    return meta, tensors


def describe(vector: SteeringVector) -> dict[str, Any]:
    """Everything but the tensor, for `ifsteer vectors show` and the server's listing."""
    info = {k: v for k, v in _fields(vector).items() if k != "direction"}
    info["phrasings"] = list(vector.phrasings)
    info["extra"] = dict(vector.extra)
    return info
