"""`torch.ops.ifsteer.steer_`: steering as one operation that compiled graphs keep.

Dynamo traces a model's forward once and CUDA graphs replay its kernels; Python between them
(a forward hook with per-step indexing) either bakes one step's plan into the graph or is
skipped. So each decoder layer's output goes through this registered op: its schema says it
adds to the residual stream in place, its fake implementation lets dynamo and inductor trace
it, and its implementation reads the step's plan from `PlanBuffers`, found by an integer
handle (as vLLM's attention op finds its layer by name), not from graph inputs.

Two ways to run the same arithmetic:

- called eagerly (no CUDA graph being captured: eager mode, or compiled on a CPU, where the
  inductor graph calls the op each step), it skips layers the step does not steer and loops
  over only the slots in use: unsteered steps cost one dispatch per layer;
- while a CUDA graph is captured, it records the full branch-free computation over every slot,
  so one graph serves any later plan (unplanned tokens have weight 0).

Either way it counts its runs on the device (`PlanBuffers.tally`), so the worker can tell a
step whose planned steering did not run.
"""

from __future__ import annotations

import itertools

import torch

from .plan import SLOTS_PER_LAYER, PlanBuffers, steering_delta

_HANDLES = itertools.count(1)
_PLANS: dict[int, PlanBuffers] = {}

# vLLM keys its compile cache by its config, not by the hooks a worker adds: engines name this
# schema in `additional_config`, so a graph compiled with the op is never loaded without it.
SCHEMA = "steer_(Tensor(a!) stream, Tensor? other, int plan, int layer) -> ()"
_LIB = torch.library.Library("ifsteer", "FRAGMENT")
_LIB.define(SCHEMA)


def attach(buffers: PlanBuffers) -> int:
    """Make `buffers` reachable from the op; the handle the model's calls name them by."""
    handle = next(_HANDLES)
    _PLANS[handle] = buffers
    return handle


def detach(handle: int) -> None:
    _PLANS.pop(handle, None)


def steer_(stream: torch.Tensor, other: torch.Tensor | None, plan: int, layer: int) -> None:
    """Add this step's steering at `layer` to `stream` in place; the residual stream the
    steering reads is `stream + other` (vLLM's Llama-style layers return the layer output and
    the residual separately, and leave their sum to the next layer's fused norm)."""
    torch.ops.ifsteer.steer_(stream, other, plan, layer)


def _steer(stream: torch.Tensor, other: torch.Tensor | None, plan: int, layer: int) -> None:
    buffers = _PLANS[plan]
    capturing = stream.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and layer not in buffers.planned:
        return
    whole = stream if other is None else stream.float() + other.float()
    slots = SLOTS_PER_LAYER if capturing else buffers.depth
    stream += steering_delta(whole, buffers, layer, slots).to(stream.dtype)
    buffers.tally[layer] += 1


def _steer_fake(stream: torch.Tensor, other: torch.Tensor | None, plan: int, layer: int) -> None:
    return None


_LIB.impl("steer_", _steer, "CompositeExplicitAutograd")
torch.library.register_fake("ifsteer::steer_", _steer_fake, lib=_LIB)
