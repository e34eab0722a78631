"""Calibration: where (layer), how hard (weight) and how to steer, on validation prompts.

Two plans share one point type (`Point`, measured into a `PointResult`), one choice rule, one
fluency rule and one answer log:

- the paper's sweep (docs/method.md §3): "no steering", then every layer of
  `range(L//5, L, 2)` (and, for additive vectors, every weight), all points of all prompts in
  one job queue (`Batcher`, or vLLM's), a row stopping as soon as its check has failed for
  good. Fluency is the paper's (`quality.PAPER_FLUENCY`): a point where most passes degenerate
  scores zero. The choice is written into the vector files (`extra["sweep"]`), so it travels
  with them; a sweep where no steering wins records `recommended: false` and keeps the file's
  default layer;
- the staged search behind the shipped vectors (docs/shipped.md): layers, then target scales
  and additive weights, then generated-only and several layers at once, judged by the search's
  fluency policy (`quality.Fluency()`); `shipped.write_calibrated` writes its point.

`choose` keeps "no steering" unless a steered point scores strictly higher, then prefers the
higher accuracy and the simpler point.

- `point`: a point (`Point`: layers, mode, a relative scale or an outright weight, positions)
  and the one way it becomes steerings (`steerings_for`), for both plans;
- `grid`: measured points, their scores and the choice (pure, torch-free);
- `answers`: every answer on disk as it is made, so a killed calibration resumes;
- `requests`: what a sweep runs (rows, vector files, the paper's grids);
- `sweep`: running the paper's sweeps on a model;
- `record`: writing a sweep's choice into the vector files (`extra["sweep"]`, read back by
  `sweep_recommends`), saving the sweep; `calibrate` does a whole group, `calibrate_groups`
  several groups in one job queue;
- `runner`: the one way both plans make answers (`answer_jobs`: a job queue, the log);
- `search`: the staged search (`run_search`) and `verify_point`, one point tried on another
  instruction; `scoring`: how a search's answers are checked, judged and scored.

Validation rows are the caller's (`ifsteer.splits.split_rows` sets some aside). Only rows every
one of whose instructions a vector steers can calibrate (`Row.fully_served`). Figures of a
sweep are the report's (`ifsteer.report.plot_sweep`).
"""

from ifsteer.calibration.answers import AnswerLog
from ifsteer.calibration.grid import (
    PointResult,
    SweepResult,
    best_steered,
    choose,
    load_sweep,
    score_point,
    sweep_filename,
)
from ifsteer.calibration.point import FILE_WEIGHT, Point, steerings_for
from ifsteer.calibration.record import (
    apply_choice,
    calibrate,
    calibrate_groups,
    group_vector_files,
    save_sweep,
    sweep_recommends,
)
from ifsteer.calibration.requests import (
    SweepRequest,
    layer_request,
    validation_groups,
    weight_request,
)
from ifsteer.calibration.search import SearchResult, SearchSpace, run_search, verify_point
from ifsteer.calibration.sweep import sweep, sweep_layers, sweep_weights, sweeps

__all__ = [
    "FILE_WEIGHT",
    "AnswerLog",
    "Point",
    "PointResult",
    "SearchResult",
    "SearchSpace",
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
    "run_search",
    "save_sweep",
    "score_point",
    "steerings_for",
    "sweep",
    "sweep_filename",
    "sweep_layers",
    "sweep_recommends",
    "sweep_weights",
    "sweeps",
    "validation_groups",
    "verify_point",
    "weight_request",
]
