"""The worker class a steered vLLM engine runs (`worker_cls`): vLLM's own, plus the extension.

vLLM compiles the model and captures its CUDA graphs during the engine's start, before the
front end can call any worker; the steering op must be in the model by then. vLLM's
`worker_extension_cls` only adds methods, so this subclass of the platform's worker class
installs the extension's layer hooks in `load_model`, the step between loading and the
first forward. Importing this module imports vLLM: only vLLM's worker processes do.
"""

from __future__ import annotations

from typing import Any

from vllm.platforms import current_platform

from .worker import SteeringWorkerExtension

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as PlatformWorker


class SteeringWorker(SteeringWorkerExtension, PlatformWorker):  # type: ignore[misc, valid-type]
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        self.ifsteer_install()
