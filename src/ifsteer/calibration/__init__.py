"""Choosing where (layer) and how hard (weight) to steer, on validation prompts.

The paper's sweep (docs/method.md §3) answers a few validation prompts once per grid point:
"no steering", then every layer of `range(L//5, L, 2)` (and, for additive vectors, every
weight). All points of all prompts go
through one batched `generate` call, each row steered at its own layer by per-row steering.
Each response is checked with IFEval's *loose* checkers and scored for fluency: a response
that repeats itself (more than half of its word trigrams seen before), or optionally that the
unsteered model finds implausibly predictable (perplexity < 2.5), is *degenerate*. A point's
score is the share of responses that pass without degenerating, and zero when most of them
degenerate. `choose` keeps "no steering" when nothing beats it, else the best point, lowest
layer (then smallest weight) on ties. The choice is written into the vector files, so it
travels with them; a sweep where no steering wins records `recommended: false` and keeps the
file's default layer.

- `grid`: grid points, scores and the choice (pure, torch-free);
- `sweep`: running a sweep on a model;
- `record`: writing the choice into the vector files, saving the sweep; `calibrate` does a
  whole group, `calibrate_groups` several groups in one job queue.

Validation rows are the caller's (`ifsteer.rows.split_rows` sets some aside). Only rows every
one of whose instructions a vector steers can calibrate (`Row.fully_served`); `calibrate` runs
one group's sweep and records it, for the CLI and the paper pipeline alike. Figures of a sweep
are the report's (`ifsteer.report.plot_sweep`).
"""

from ifsteer.calibration.grid import (
    Choice,
    Fluency,
    GridPoint,
    SweepResult,
    best_steered,
    choose,
    load_sweep,
    score_point,
    sweep_filename,
)
from ifsteer.calibration.record import (
    apply_choice,
    calibrate,
    calibrate_groups,
    group_vector_files,
    save_sweep,
)
from ifsteer.calibration.sweep import (
    SweepRequest,
    layer_request,
    sweep,
    sweep_layers,
    sweep_weights,
    sweeps,
    validation_groups,
    weight_request,
)

__all__ = [
    "Choice",
    "Fluency",
    "GridPoint",
    "SweepRequest",
    "SweepResult",
    "apply_choice",
    "best_steered",
    "calibrate",
    "calibrate_groups",
    "choose",
    "group_vector_files",
    "layer_request",
    "load_sweep",
    "save_sweep",
    "score_point",
    "sweep",
    "sweep_filename",
    "sweep_layers",
    "sweep_weights",
    "sweeps",
    "validation_groups",
    "weight_request",
]
