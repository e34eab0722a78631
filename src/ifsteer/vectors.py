"""Steering vectors: extraction, algebra, files.

A vector is the mean difference of residual-stream activations at the last prompt token, at the
output of one decoder layer, between prompts with and without an instruction (PAPER.md §1). We
keep it as a unit direction û plus its norm, and the mean with-instruction projection c̄ that
projection steering sets every position to. Files are safetensors with JSON metadata; one file
can hold the directions of several layers, so a layer chosen later (by a sweep, or `--layer`)
needs no second extraction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ifsteer import __version__
from ifsteer.errors import InvalidSteering, MalformedVectorFile, VectorMismatch
from ifsteer.instructions import Instruction, Mode
from ifsteer.models import LoadedModel
from ifsteer.prompts import BASE_QUERIES, PromptPair, build_pairs

MODES: tuple[Mode, ...] = ("projection", "additive")
FORMAT_NAME = "ifsteer.vector"
FORMAT_VERSION = 1
Progress = Callable[[int], None]


@dataclass(frozen=True)
class SteeringVector:
    """One instruction's direction at one layer, and how to apply it by default.

    `weight` scales what is applied: the added amount `weight·û` in additive mode, the target
    projection `weight·c̄` in projection mode (1 reproduces the paper). Algebra acts on weight,
    so `v * 20` applied is the same as `v` applied with weight 20.
    """

    direction: torch.Tensor
    norm: float
    layer: int
    target: float
    model_id: str
    hidden_size: int
    instruction: str
    instruction_id: str
    phrasings: tuple[str, ...] = ()
    n_pairs: int = 0
    mode: Mode = "projection"
    weight: float = 1.0
    version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction.ndim != 1 or self.direction.shape[0] != self.hidden_size:
            raise VectorMismatch(
                f"direction has shape {tuple(self.direction.shape)}, expected ({self.hidden_size},)"
            )
        if self.mode not in MODES:
            raise InvalidSteering(f"unknown mode {self.mode!r}; choose projection or additive")
        if not math.isfinite(self.weight):
            raise InvalidSteering(f"weight must be a finite number, got {self.weight}")

    @property
    def value(self) -> torch.Tensor:
        """The displacement additive steering adds: weight·û."""
        return self.weight * self.direction

    def with_defaults(
        self, *, mode: Mode | None = None, weight: float | None = None
    ) -> SteeringVector:
        return replace(
            self,
            mode=self.mode if mode is None else mode,
            weight=self.weight if weight is None else float(weight),
        )

    def __mul__(self, scale: float) -> SteeringVector:
        return replace(self, weight=self.weight * float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> SteeringVector:
        return self * (1.0 / scale)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __add__(self, other: SteeringVector) -> SteeringVector:
        """Sum of the two additive displacements, as one additive vector at their layer.

        Projection vectors do not add (each sets its own component); compose those by passing
        both to `steer`.
        """
        if not isinstance(other, SteeringVector):
            return NotImplemented
        _check_compatible(self, other)
        total = self.value + other.value
        norm = float(total.norm())
        direction = total / norm if norm > 0 else total
        return replace(
            self,
            direction=direction,
            norm=norm,
            target=0.0,
            instruction=f"{self.instruction} + {other.instruction}",
            instruction_id=f"{self.instruction_id}+{other.instruction_id}",
            phrasings=self.phrasings + other.phrasings,
            n_pairs=self.n_pairs + other.n_pairs,
            mode="additive",
            weight=norm,
        )

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def check_fits(
        self, model_id: str, hidden_size: int, n_layers: int, *, allow_transfer: bool = False
    ) -> None:
        """Refuse a vector that cannot mean anything on this model, with one line that says why."""
        if self.hidden_size != hidden_size:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} has hidden size {self.hidden_size} "
                f"(model {self.model_id}), this model has {hidden_size}"
            )
        if not 0 <= self.layer < n_layers:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} is for layer {self.layer}, "
                f"this model has layers 0..{n_layers - 1}"
            )
        if self.model_id != model_id and not allow_transfer:
            raise VectorMismatch(
                f"vector {self.instruction_id!r} was extracted from {self.model_id!r}, not "
                f"{model_id!r}; pass allow_transfer (--allow-transfer) to apply it anyway"
            )


def _check_compatible(a: SteeringVector, b: SteeringVector) -> None:
    if a.hidden_size != b.hidden_size or a.layer != b.layer:
        raise VectorMismatch(
            f"cannot add vectors at layer {a.layer} (hidden {a.hidden_size}) and layer "
            f"{b.layer} (hidden {b.hidden_size}); steer with both instead"
        )
    if a.mode == "projection" and a.weight and b.mode == "projection" and b.weight:
        raise InvalidSteering(
            "projection vectors do not add; pass both to steer(), or switch them to additive"
        )


# --- extraction ---------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the deepest hook: layers past it cannot change what we record."""


@torch.no_grad()
def last_token_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """Residual stream after each layer at the last prompt token, as float32 [n_prompts, hidden].

    The forward stops after the deepest requested layer, so extracting at layer 6 of 30 costs
    a fifth of a full pass.
    """
    wanted = sorted(set(layers))
    if not wanted:
        raise InvalidSteering("no layers requested")
    for layer in wanted:
        if not 0 <= layer < lm.n_layers:
            raise VectorMismatch(f"layer {layer} is out of range 0..{lm.n_layers - 1}")
    deepest = wanted[-1]
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            collected[layer].append(hidden[:, -1, :].float().cpu())
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [lm.layers[layer].register_forward_hook(make_hook(layer)) for layer in wanted]
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = lm.encode(chunk)
            try:
                lm.model(**batch, use_cache=False)
            except _StopForward:
                pass
            if progress is not None:
                progress(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


def extract_vectors(
    lm: LoadedModel,
    pairs: Sequence[PromptPair],
    layers: Iterable[int],
    *,
    instruction: str,
    instruction_id: str,
    phrasings: Sequence[str] = (),
    mode: Mode = "projection",
    batch_size: int = 16,
    progress: Progress | None = None,
) -> dict[int, SteeringVector]:
    """One batched pass over both halves of every pair gives a vector for every layer.

    Additive vectors default to weight = ‖u‖, i.e. adding the mean difference once; projection
    vectors default to weight 1, the paper's c̄.
    """
    if not pairs:
        raise InvalidSteering("no prompt pairs to extract from")
    layers = sorted(set(layers))
    prompts = [p.with_instruction for p in pairs] + [p.without_instruction for p in pairs]
    acts = last_token_activations(lm, prompts, layers, batch_size, progress)
    n = len(pairs)
    vectors: dict[int, SteeringVector] = {}
    for layer in layers:
        with_acts, without_acts = acts[layer][:n], acts[layer][n:]
        mean_diff = (with_acts - without_acts).mean(dim=0)
        norm = float(mean_diff.norm())
        if norm == 0.0:
            raise InvalidSteering(
                f"prompts with and without {instruction_id!r} give identical activations at "
                f"layer {layer}; the instruction text does not reach the model"
            )
        direction = mean_diff / norm
        vectors[layer] = SteeringVector(
            direction=direction,
            norm=norm,
            layer=layer,
            target=float((with_acts @ direction).mean()),
            model_id=lm.model_id,
            hidden_size=lm.hidden_size,
            instruction=instruction,
            instruction_id=instruction_id,
            phrasings=tuple(phrasings),
            n_pairs=n,
            mode=mode,
            weight=1.0 if mode == "projection" else norm,
        )
    return vectors


def extract_instruction(
    lm: LoadedModel,
    instruction: Instruction,
    layers: Iterable[int],
    *,
    n_pairs: int = 64,
    queries: Sequence[str] = BASE_QUERIES,
    batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[int, SteeringVector]:
    """Pairs from our base queries × the instruction's phrasings, then `extract_vectors`."""
    pairs = build_pairs(instruction, n_pairs, queries, seed=seed)
    return extract_vectors(
        lm,
        pairs,
        layers,
        instruction=instruction.phrasings[0],
        instruction_id=instruction.id,
        phrasings=instruction.phrasings,
        mode=instruction.mode,
        batch_size=batch_size,
        progress=progress,
    )


def default_layers(n_layers: int) -> list[int]:
    """The paper's sweep grid, range(L//5, L, 2): the layers worth extracting up front."""
    return list(range(n_layers // 5, n_layers, 2))


def default_layer(n_layers: int) -> int:
    """A layer that steers without a sweep: about a third of the way into the model.

    Measured on the embedded model (see README); `ifsteer sweep` picks a better one per
    instruction.
    """
    return max(n_layers // 3, 0)


# --- files --------------------------------------------------------------------------------

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
        "layers": {str(v.layer): {"norm": v.norm, "target": v.target} for v in vectors},
        **shared,
    }
    tensors = {
        f"layer.{v.layer}.direction": v.direction.detach().float().contiguous().cpu()
        for v in vectors
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"ifsteer": json.dumps(meta)})
    tmp.replace(path)
    return path


def _fields(vector: SteeringVector) -> dict[str, Any]:
    return {f: getattr(vector, f) for f in vector.__dataclass_fields__}


def load_vectors(path: str | Path) -> tuple[dict[int, SteeringVector], int]:
    """All layers in a file and its default layer."""
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
                **{**shared, "phrasings": tuple(shared["phrasings"])},
            )
            for layer, info in meta["layers"].items()
        }
        default = int(meta["default_layer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedVectorFile(f"{path}: metadata is incomplete ({exc})") from None
    if default not in vectors:
        raise MalformedVectorFile(f"{path}: default layer {default} has no direction")
    return vectors, default


def load_vector(path: str | Path, layer: int | None = None) -> SteeringVector:
    vectors, default = load_vectors(path)
    chosen = default if layer is None else layer
    if chosen not in vectors:
        raise VectorMismatch(
            f"{path} holds layers {sorted(vectors)}, not {chosen}; "
            "re-extract with that layer (ifsteer extract --layers)"
        )
    return vectors[chosen]


def update_defaults(
    path: str | Path,
    *,
    layer: int | None = None,
    weight: float | None = None,
    mode: Mode | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Record a calibrated layer/weight/mode in the file itself, so the choice travels with it."""
    vectors, default = load_vectors(path)
    updated = [
        replace(v.with_defaults(mode=mode, weight=weight), extra={**v.extra, **(extra or {})})
        for v in vectors.values()
    ]
    return save_vectors(path, updated, default if layer is None else layer)


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


__all__ = [
    "MODES",
    "Mode",
    "SteeringVector",
    "default_layer",
    "default_layers",
    "describe",
    "extract_instruction",
    "extract_vectors",
    "last_token_activations",
    "load_vector",
    "load_vectors",
    "save_vectors",
    "update_defaults",
]
