"""The worker side of the vLLM adapter: what connects vLLM's runner to the plan and the op.

`SteeringWorkerExtension` is mixed into vLLM's worker class (`vllm_worker.SteeringWorker`,
which engines name as `worker_cls`). Right after vLLM loads the model, and so before vLLM
compiles it or captures CUDA graphs, `ifsteer_install` hooks every decoder layer with a call
to `torch.ops.ifsteer.steer_` (`op.py`): dynamo traces that call into the compiled graph, and
the op reads each step's plan from buffers allocated here (`plan.PlanBuffers`).

Each step, the runner's `execute_model(scheduler_output)` is wrapped to keep how many tokens
each request has; its `_model_forward` (called with the step's inputs after the batch is laid
out, before the compiled or graph-replaying model) is wrapped to turn the runner's batch order,
each request's prompt length and `SamplingParams.extra_args["ifsteer"]` into a `plan.Plan`
and load it. After the step, the wrapper checks on the device count that every planned layer's
op ran (on GPUs at the next step, so the host never waits for the device): a runner that
skipped it fails loudly instead of serving unsteered text.

The front end calls, on every worker, with `collective_rpc`: `ifsteer_register(entries)` (put
vectors in the bank) and `ifsteer_info()`. Targets vLLM 0.32.0's V1 model runner
(`vllm/v1/worker/gpu_model_runner.py`, which the CPU runner subclasses); the attributes read
here (`input_batch.req_ids`, `input_batch.num_reqs`, `requests[id].sampling_params`,
`requests[id].num_prompt_tokens`, `_model_forward`, `max_num_tokens`) are internal and change
between releases. Nothing in this module imports vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from . import op
from .plan import EXTRA_ARGS_KEY, Entry, Plan, PlanBuffers, VectorBank, build_plan

log = logging.getLogger("ifsteer.backends.vllm")


class _State:
    """Per-worker state of the extension: the bank, the plan buffers, this step's plan."""

    def __init__(self, buffers: PlanBuffers, handle: int) -> None:
        self.buffers = buffers
        self.handle = handle
        self.scheduled: Mapping[str, int] | None = None
        self.plan: Plan | None = None
        self.plan_key: tuple[Any, ...] | None = None
        self.steered_steps = 0


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; its methods run on every worker via `collective_rpc`.

    `self` is the vLLM worker: `self.model_runner` is its (GPU or CPU) V1 model runner.
    """

    def ifsteer_install(self) -> None:
        """Hook the loaded model; called by `SteeringWorker.load_model`, before vLLM runs,
        compiles or captures it."""
        from ifsteer.models import find_decoder_layers

        runner = self.model_runner  # type: ignore[attr-defined]
        refuse_unsupported(runner)
        model = runner.get_model()
        layers = find_decoder_layers(model)
        bank = VectorBank(
            int(runner.model_config.get_hidden_size()), next(model.parameters()).device
        )
        buffers = PlanBuffers(len(layers), int(runner.max_num_tokens), bank)
        state = _State(buffers, op.attach(buffers))
        self._ifsteer = state
        execute, forward = runner.execute_model, runner._model_forward

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            _check(buffers)  # the last step's, where the device runs ahead of the host
            state.scheduled = dict(scheduler_output.num_scheduled_tokens)
            try:
                result = execute(scheduler_output, *args, **kwargs)
            finally:
                state.scheduled = None
            buffers.record()
            if buffers.bank.device.type == "cpu":  # nothing runs ahead: check this step now
                _check(buffers)
            return result

        def model_forward(*args: Any, **kwargs: Any) -> Any:
            self._ifsteer_plan(kwargs.get("positions"))
            return forward(*args, **kwargs)

        runner.execute_model = execute_model
        runner._model_forward = model_forward
        for index, layer in enumerate(layers):
            if type(layer).__name__ == "PPMissingLayer":  # owned by another pipeline stage
                continue
            layer.register_forward_hook(_layer_hook(state.handle, index))

    def ifsteer_register(self, entries: list[dict[str, Any]]) -> int:
        return self._ifsteer.buffers.bank.register(entries)  # type: ignore[attr-defined]

    def ifsteer_info(self) -> dict[str, Any]:
        """What the front end checks and tests read: sizes, steered steps, the runner and
        how vLLM runs the model (compilation mode, CUDA graph mode)."""
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        runner = self.model_runner  # type: ignore[attr-defined]
        compilation = runner.vllm_config.compilation_config
        graphs = getattr(compilation, "cudagraph_mode", None)
        return {
            "hidden_size": state.buffers.bank.hidden_size,
            "vectors": len(state.buffers.bank.layers),
            "steered_steps": state.steered_steps,
            "runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
            "compilation_mode": int(getattr(compilation, "mode", 0) or 0),
            "cudagraph_mode": getattr(graphs, "name", str(graphs)),
        }

    def _ifsteer_plan(self, positions: torch.Tensor | None) -> None:
        """Before the model runs a step: load its plan (or none) into the buffers."""
        state: _State = self._ifsteer  # type: ignore[attr-defined]
        scheduled, buffers = state.scheduled, state.buffers
        if scheduled is None:  # a forward outside execute_model: nothing to steer
            buffers.load(None, None)
            return
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        key = tuple((rid, scheduled.get(rid, 0)) for rid in req_ids)
        if key != state.plan_key:  # decode steps of the same requests reuse the plan
            requests, lengths = [], []
            for rid in req_ids:
                request = runner.requests[rid]
                params = request.sampling_params
                raw = ((params.extra_args or {}) if params is not None else {}).get(EXTRA_ARGS_KEY)
                requests.append((scheduled.get(rid, 0), [Entry.parse(e) for e in raw or ()]))
                lengths.append(int(request.num_prompt_tokens))
            steered = any(entries for _, entries in requests)
            state.plan = build_plan(requests, buffers.bank, lengths) if steered else None
            state.plan_key = key
        buffers.load(state.plan, positions)
        if buffers.planned:
            buffers.clear_tally()
            state.steered_steps += 1


def _check(buffers: PlanBuffers) -> None:
    """Fail the step when a planned layer's op did not run, rather than serve unsteered text."""
    missed = buffers.missed()
    if missed:
        buffers.load(None, None)
        raise RuntimeError(
            f"ifsteer: the steering op of layers {missed} did not run in a steered step; this "
            "runner does not run the model the op was installed in, so steering cannot be applied"
        )


def _layer_hook(handle: int, index: int) -> Any:
    """A decoder layer's forward hook: the op, with constants only, so dynamo traces it.

    Llama-style layers return `(hidden, residual)`: the stream is their sum and the delta goes
    into the residual. Layers that return one tensor (GPT-2) get it added directly."""

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            op.steer_(output[1], output[0], handle, index)
        else:
            op.steer_(output[0] if isinstance(output, tuple) else output, None, handle, index)

    return hook


def refuse_unsupported(runner: Any) -> None:
    """Refuse, with the setting to change, every runner configuration the op cannot steer
    correctly: Model Runner V2 (another batch layout, no `_model_forward` per step) and
    speculative decoding (draft tokens would be steered as if accepted, and the drafter is
    not steered). Compilation and CUDA graphs are fine: the op is in the graph."""
    config = runner.vllm_config
    if getattr(config, "use_v2_model_runner", False) or not hasattr(runner, "input_batch"):
        raise RuntimeError(
            "ifsteer steering needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    if getattr(config, "speculative_config", None) is not None:
        raise RuntimeError("ifsteer steering does not support speculative decoding")
