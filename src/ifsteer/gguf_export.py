"""Steering vectors as llama.cpp control vectors (GGUF, architecture "controlvector").

llama.cpp reads tensors named `direction.N`, scales them (`--control-vector-scaled FILE S`, or
1 with `--control-vector FILE`) and adds them to the residual stream after decoder layer N,
counted from 0 as ours are, at every position: `direction.N` lands in its per-layer slot N, and
slot `il` is added after layer `il`. It refuses `direction.0`, so the output of the first layer
cannot be steered there.

That is our additive mode, so an additive vector is written as `weight·û`. Projection mode sets
each activation's component along û to `weight·c̄`, which depends on the activation and has no
control-vector form; it is written as its additive equivalent, the shift that takes the mean
*without-instruction* activation to the target: `(weight·c̄ − (c̄ − ‖u‖))·û`, which is `u`
itself at weight 1 (c̄ − ‖u‖ is the mean without-instruction component, since u is the mean
difference). Exact for an average activation, weaker on outliers than projection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ifsteer import __version__
from ifsteer.errors import InvalidSteering, MalformedVectorFile, VectorMismatch
from ifsteer.vectors import SteeringVector

ARCH = "controlvector"


def additive_coefficient(vector: SteeringVector) -> float:
    """The scale of û written to the file: the weight, or projection's additive equivalent."""
    if vector.mode == "additive":
        return vector.weight
    return vector.weight * vector.target - (vector.target - vector.norm)


def to_gguf(
    vectors: Sequence[SteeringVector] | Mapping[Any, SteeringVector],
    path: str | Path,
    *,
    model_hint: str | None = None,
) -> Path:
    """Write one control-vector file; vectors at the same layer are summed, as llama.cpp would."""
    import gguf

    chosen = list(vectors.values()) if isinstance(vectors, Mapping) else list(vectors)
    if not chosen:
        raise InvalidSteering("nothing to export")
    hidden = chosen[0].hidden_size
    by_layer: dict[int, np.ndarray] = {}
    described = []
    for v in chosen:
        if v.hidden_size != hidden:
            raise VectorMismatch(
                f"cannot put vectors of hidden size {hidden} and {v.hidden_size} in one file"
            )
        if v.layer < 1:
            raise InvalidSteering(
                f"vector {v.instruction_id!r} is at layer 0, which llama.cpp cannot steer "
                "(it refuses direction.0); extract it at a layer of 1 or more"
            )
        coefficient = additive_coefficient(v)
        direction = v.direction.detach().float().cpu().numpy().astype(np.float32)
        by_layer[v.layer] = by_layer.get(v.layer, 0) + coefficient * direction
        described.append(
            {
                "instruction_id": v.instruction_id,
                "layer": v.layer,
                "mode": v.mode,
                "weight": v.weight,
                "coefficient": coefficient,
                "exported_as": "additive" if v.mode == "additive" else "additive-equivalent",
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its file is owner-only, and llama.cpp may well run as another user.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint or chosen[0].model_id)
        writer.add_uint32(f"{ARCH}.layer_count", len(by_layer))
        writer.add_string("ifsteer.version", __version__)
        writer.add_string("ifsteer.vectors", json.dumps(described))
        for layer in sorted(by_layer):
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(by_layer[layer]))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_gguf(path: str | Path) -> dict[int, np.ndarray]:
    """The directions of a control-vector file, by layer (as llama.cpp would add them)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    if field is None or field.contents() != ARCH:
        raise MalformedVectorFile(f"{path}: not a llama.cpp control vector")
    found = {}
    for tensor in reader.tensors:
        prefix, _, layer = tensor.name.partition(".")
        if prefix != "direction" or not layer.isdigit():
            raise MalformedVectorFile(f"{path}: unexpected tensor {tensor.name!r}")
        found[int(layer)] = np.array(tensor.data, dtype=np.float32)
    return found


__all__ = ["additive_coefficient", "read_gguf", "to_gguf"]
