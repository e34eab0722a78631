"""`ifsteer run-paper`: plan the paper's format experiment for one model (`plan`), then run
it end to end, resumably (`run`)."""

from ifsteer.pipeline.plan import (
    DEFAULTS,
    PaperConfig,
    PipelineError,
    Plan,
    estimate_seconds,
    full_command,
    full_config,
    full_plan,
    minutes_text,
    plan_run,
    preview,
    sweep_grid,
)
from ifsteer.pipeline.run import run_paper

__all__ = [
    "DEFAULTS",
    "PaperConfig",
    "PipelineError",
    "Plan",
    "estimate_seconds",
    "full_command",
    "full_config",
    "full_plan",
    "minutes_text",
    "plan_run",
    "preview",
    "run_paper",
    "sweep_grid",
]
