"""Extraction: one batched forward over prompt pairs gives a vector for every layer.

The forward stops after the deepest requested layer, so the directions of the whole sweep grid
cost one partial pass (docs/method.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ifsteer.errors import InvalidSteering, VectorMismatch
from ifsteer.instructions import Instruction, Mode
from ifsteer.models import LoadedModel
from ifsteer.prompts import BASE_QUERIES, PromptPair, build_pairs
from ifsteer.vectors.vector import SteeringVector

Progress = Callable[[int], None]


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
    acts = last_token_activations(lm, pair_prompts(pairs), layers, batch_size, progress)
    return vectors_from_activations(
        lm,
        acts,
        instruction=instruction,
        instruction_id=instruction_id,
        phrasings=phrasings,
        mode=mode,
    )


def pair_prompts(pairs: Sequence[PromptPair]) -> list[str]:
    """Every pair's with-instruction half, then every without half: what a pass reads."""
    return [p.with_instruction for p in pairs] + [p.without_instruction for p in pairs]


def vectors_from_activations(
    lm: LoadedModel,
    acts: dict[int, torch.Tensor],
    *,
    instruction: str,
    instruction_id: str,
    phrasings: Sequence[str] = (),
    mode: Mode = "projection",
) -> dict[int, SteeringVector]:
    """The vectors from `pair_prompts`' activations, so a caller (the server) can gather them
    in pieces between other work."""
    vectors: dict[int, SteeringVector] = {}
    for layer, layer_acts in sorted(acts.items()):
        n = len(layer_acts) // 2
        with_acts, without_acts = layer_acts[:n], layer_acts[n:]
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
