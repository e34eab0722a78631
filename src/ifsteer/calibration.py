"""Choosing where (layer) and how hard (weight) to steer, on validation prompts (PAPER.md §3).

A sweep answers a few validation prompts once per grid point: "no steering", then every layer
of `range(L//5, L, 2)` (and, for additive vectors, every weight). All points of all prompts go
through one batched `generate` call, each row steered at its own layer by per-row steering.
Each response is checked with IFEval's *loose* checkers and scored for fluency: a response
that repeats itself (more than half of its word trigrams seen before), or optionally that the
unsteered model finds implausibly predictable (perplexity < 2.5), is *degenerate*. A point's
score is the share of responses that pass without degenerating, and zero when most of them
degenerate. `choose` keeps "no steering" when nothing beats it, else the best point, lowest
layer (then smallest weight) on ties. The choice is written into the vector files, so it
travels with them; a sweep where no steering wins records `recommended: false` and keeps the
file's default layer.

Validation rows are the caller's: the paper validates on held-out prompts, and for the format
set we have only the 163 test prompts, so `split_rows` sets a few rows of each instruction
aside for sweeps and leaves the rest for evaluation, deterministically and without overlap.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ifsteer import quality
from ifsteer.checks import check_row
from ifsteer.errors import IfsteerError, InvalidSteering, VectorMismatch
from ifsteer.evaluation import Row
from ifsteer.generation import Sampling, generate
from ifsteer.models import LoadedModel
from ifsteer.steering import Steering
from ifsteer.vectors import Mode, SteeringVector, default_layers, load_vectors, update_defaults

__all__ = [
    "Choice",
    "Fluency",
    "GridPoint",
    "Split",
    "SweepResult",
    "apply_choice",
    "choose",
    "draw_sweep",
    "group_of",
    "group_vector_files",
    "load_sweep",
    "plot_sweep",
    "save_sweep",
    "score_point",
    "split_rows",
    "sweep",
    "sweep_filename",
    "sweep_layers",
    "sweep_weights",
]

Progress = Callable[[int], None]
VectorSource = str | Path | Mapping[str, str | Path]
# A response whose trigrams repeat more than this, or whose perplexity under the unsteered
# model is below MIN_PERPLEXITY (when measured), is degenerate (ifsteer.quality).
MAX_REPETITION = 0.5
MIN_PERPLEXITY = 2.5
# A grid point where more than this share of responses degenerate scores zero.
MAX_DEGENERATE = 0.5
DEFAULT_SAMPLING = Sampling(max_new_tokens=128)


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fluency:
    """How a grid point's responses read: mean trigram repetition, median perplexity under the
    unsteered model (None when not measured), and the share of degenerate responses."""

    repetition: float
    perplexity: float | None
    degenerate: float


@dataclass(frozen=True)
class GridPoint:
    """One (layer, weight) of a sweep; layer None is "no steering", weight None the file's."""

    layer: int | None
    weight: float | None
    accuracy: float
    fluency: Fluency
    score: float
    n: int


@dataclass(frozen=True)
class Choice:
    layer: int | None
    weight: float | None
    score: float

    @property
    def recommended(self) -> bool:
        """Whether steering beat "no steering" on the validation prompts."""
        return self.layer is not None


@dataclass(frozen=True)
class SweepResult:
    """A sweep's grid, its choice, and what it was run on (saved as sweeps/<id>.json)."""

    instruction_id: str
    model: str
    with_instruction: bool
    mode: Mode
    grid: list[GridPoint]
    chosen: Choice
    rows: list[str] = field(default_factory=list)
    vector_ids: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    responses: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "instruction_id": self.instruction_id,
            "model": self.model,
            "with_instruction": self.with_instruction,
            "mode": self.mode,
            "grid": [asdict(p) for p in self.grid],
            "chosen": {**asdict(self.chosen), "recommended": self.chosen.recommended},
            "rows": list(self.rows),
            "vector_ids": list(self.vector_ids),
            "max_new_tokens": self.max_new_tokens,
            "rule": {
                "score": "loose pass and not degenerate; 0 when more than "
                f"{MAX_DEGENERATE:g} of the responses degenerate",
                "max_repetition": MAX_REPETITION,
                "min_perplexity": MIN_PERPLEXITY,
                "ties": "no steering if it scores at least as well, else lowest layer, "
                "then smallest |weight|",
            },
        }


def sweep_filename(instruction_id: str) -> str:
    """`sweeps/<id>.json` with ':' replaced by '__', so ids are valid file names everywhere."""
    return instruction_id.replace(":", "__").replace("/", "_")


# --- selection (pure) -----------------------------------------------------------------------


def score_point(
    passed: Sequence[bool], degenerate: Sequence[bool], *, max_degenerate: float = MAX_DEGENERATE
) -> tuple[float, float]:
    """(accuracy, score) of one grid point's responses.

    Accuracy is the share that pass their checks. The score only counts passes that did not
    degenerate, and is zero when more than `max_degenerate` of the responses degenerate: a
    layer that breaks the model must not win by repeating the right word.
    """
    if len(passed) != len(degenerate):
        raise ValueError(f"{len(passed)} verdicts but {len(degenerate)} fluency flags")
    n = len(passed)
    if n == 0:
        return 0.0, 0.0
    accuracy = sum(map(bool, passed)) / n
    if sum(map(bool, degenerate)) / n > max_degenerate:
        return accuracy, 0.0
    return accuracy, sum(p and not d for p, d in zip(passed, degenerate, strict=True)) / n


def choose(grid: Sequence[GridPoint]) -> Choice:
    """The best point of a sweep.

    "No steering" (layer None) wins when its score is at least every steered point's: steering
    must earn its place. Otherwise the highest score wins, the lowest layer on ties, then the
    smallest |weight|. A grid without a "no steering" point picks among its layers.
    """
    if not grid:
        raise InvalidSteering("an empty sweep has nothing to choose from")
    baseline = [p for p in grid if p.layer is None]
    steered = [p for p in grid if p.layer is not None]
    if steered:
        best = min(
            steered,
            key=lambda p: (-round(p.score, 9), p.layer, abs(p.weight or 0.0)),
        )
        if not baseline or round(best.score, 9) > round(max(p.score for p in baseline), 9):
            return Choice(best.layer, best.weight, best.score)
    top = max(baseline, key=lambda p: p.score)
    return Choice(None, None, top.score)


def best_steered(grid: Sequence[GridPoint]) -> GridPoint | None:
    """The best steered point (what `choose` would pick if "no steering" were not allowed)."""
    steered = [p for p in grid if p.layer is not None]
    if not steered:
        return None
    return min(steered, key=lambda p: (-round(p.score, 9), p.layer, abs(p.weight or 0.0)))


# --- validation split -----------------------------------------------------------------------


def group_of(row: Row) -> str:
    """The sweep a row belongs to: its first IFEval instruction id.

    All response-language rows form one group ("language:response_language"): with one or two
    rows per language there is too little to sweep each language alone (the paper's sweep also
    uses one row per language), so the languages share one layer.
    """
    if not row.instruction_id_list:
        raise IfsteerError(f"{row.source}: row {row.key!r} has no instruction to sweep")
    return row.instruction_id_list[0]


def _rank(seed: int, key: object) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _served_ids(row: Row) -> list[str]:
    return [vector_id for vector_id, _ in row.served_vectors()]


@dataclass(frozen=True)
class Split:
    """Validation rows per group (for sweeps) and the evaluation rows, never overlapping.

    `evaluation` interleaves the groups round-robin, so its first N rows cover every
    instruction about equally: `--limit N` takes a prefix, and a larger limit extends it.
    """

    validation: dict[str, list[Row]]
    evaluation: list[Row]
    per_group: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "per_group": self.per_group,
            "seed": self.seed,
            "rule": "per instruction, rows ranked by sha256(seed:key); the first "
            "min(per_group, n // 2) preferring distinct vectors go to validation, "
            "the rest to evaluation (interleaved round-robin across instructions)",
            "validation": {g: [r.key for r in rows] for g, rows in self.validation.items()},
            "evaluation": [r.key for r in self.evaluation],
        }


def split_rows(rows: Sequence[Row], per_group: int, *, seed: int = 0) -> Split:
    """Set aside up to `per_group` rows of each instruction for its sweep (never more than half
    of that instruction's rows), the rest for evaluation. Same rows and seed, same split.

    Within the language group, distinct languages are preferred, so a sweep sees several.
    """
    if per_group < 0:
        raise InvalidSteering(f"per_group must be at least 0, got {per_group}")
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(group_of(row), []).append(row)
    validation: dict[str, list[Row]] = {}
    rest: dict[str, list[Row]] = {}
    for group, members in sorted(groups.items()):
        ranked = sorted(members, key=lambda r: _rank(seed, r.key))
        take = min(per_group, len(ranked) // 2)
        chosen: list[Row] = []
        seen: set[tuple[str, ...]] = set()
        for row in ranked:  # first pass: one row per distinct vector set
            ids = tuple(_served_ids(row))
            if len(chosen) < take and ids not in seen:
                chosen.append(row)
                seen.add(ids)
        for row in ranked:  # then fill up in rank order
            if len(chosen) < take and row not in chosen:
                chosen.append(row)
        if chosen:
            validation[group] = chosen
        rest[group] = [r for r in ranked if r not in chosen]
    evaluation: list[Row] = []
    depth = max((len(v) for v in rest.values()), default=0)
    for i in range(depth):
        evaluation.extend(members[i] for members in rest.values() if i < len(members))
    return Split(validation, evaluation, per_group, seed)


# --- running a sweep ------------------------------------------------------------------------


def _vector_map(vectors: VectorSource, rows: Sequence[Row]) -> dict[str, Path]:
    """Vector files by id: a directory, a mapping, or one file that serves every row."""
    if isinstance(vectors, Mapping):
        return {k: Path(v) for k, v in vectors.items()}
    path = Path(vectors)
    if path.is_dir():
        from ifsteer.evaluation import vector_directory

        return vector_directory(path)
    loaded, default = load_vectors(path)
    own = loaded[default].instruction_id
    mapping = {own: path}
    for row in rows:  # a single file serves every row, whatever id the row asks for
        for vector_id in _served_ids(row):
            mapping.setdefault(vector_id, path)
    return mapping


def _layers_for(
    files: Mapping[str, dict[int, SteeringVector]], layers: Sequence[int] | None, n_layers: int
) -> list[int]:
    common = set.intersection(*(set(v) for v in files.values()))
    if layers is not None:
        missing = sorted(set(layers) - common)
        if missing:
            raise VectorMismatch(
                f"the vector files lack layers {missing} (they share {sorted(common)}); "
                "re-extract with those layers (ifsteer extract --layers)"
            )
        return sorted(set(layers))
    grid = [layer for layer in default_layers(n_layers) if layer in common]
    return grid or sorted(common)


def sweep(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    points: Sequence[tuple[int | None, float | None]],
    *,
    instruction_id: str | None = None,
    with_instruction: bool = False,
    mode: Mode | None = None,
    sampling: Sampling = DEFAULT_SAMPLING,
    batch_size: int = 8,
    perplexity: bool = False,
    max_degenerate: float = MAX_DEGENERATE,
    progress: Progress | None = None,
) -> SweepResult:
    """Answer every row at every (layer, weight) point in one batched pass, and score it.

    Each row is steered by the vectors that serve its instructions (`vector_id_for`), so rows
    of different languages or keywords share one sweep; a forbidden word's inclusion vector
    gets the negated weight, as in evaluation. Rows without a vector are left out.
    """
    if not points:
        raise InvalidSteering("a sweep needs at least one (layer, weight) point")
    mapping = _vector_map(vectors, rows)
    usable: list[tuple[Row, list[tuple[str, bool]]]] = []
    for row in rows:
        served = row.served_vectors()
        if served and all(v in mapping for v, _ in served):
            usable.append((row, served))
    if not usable:
        raise IfsteerError(
            "no validation row has a vector file for its instruction; extract the vectors first "
            f"(have: {', '.join(sorted(mapping)) or 'none'})"
        )
    needed = sorted({v for _, served in usable for v, _ in served})
    files = {v: load_vectors(mapping[v])[0] for v in needed}
    for loaded in files.values():
        any_vector = next(iter(loaded.values()))
        any_vector.check_fits(lm.model_id, lm.hidden_size, lm.n_layers)
    for layer, _ in points:
        if layer is not None and not all(layer in f for f in files.values()):
            raise VectorMismatch(
                f"layer {layer} is missing from a vector file; re-extract with that layer"
            )

    prompts: list[str] = []
    per_row: list[list[Steering]] = []
    index: list[tuple[int, int]] = []  # (point, row) of each generation
    for p, (layer, weight) in enumerate(points):
        for r, (row, served) in enumerate(usable):
            text = row.prompt if with_instruction else row.prompt_without_instruction
            if text is None:
                raise IfsteerError(
                    f"{row.source}: row {row.key!r} has no prompt_without_instruction; "
                    "sweep it with --with-instruction"
                )
            prompts.append(text)
            index.append((p, r))
            if layer is None:
                per_row.append([])
                continue
            steerings = []
            for vector_id, negate in served:
                vector = files[vector_id][layer]
                w = vector.weight if weight is None else float(weight)
                steerings.append(Steering(vector, mode=mode, weight=-w if negate else w))
            per_row.append(steerings)
    completions = generate(
        lm, prompts, per_row=per_row, sampling=sampling, batch_size=batch_size,
        progress=progress,
    )
    texts = [c.text for c in completions]
    ppl: list[float | None] = [None] * len(texts)
    if perplexity:
        ppl = [
            None if math.isnan(x) else x
            for x in quality.perplexities(lm, prompts, texts, batch_size=batch_size)
        ]
    records: list[dict[str, Any]] = []
    for (p, r), text, x in zip(index, texts, ppl, strict=True):
        row = usable[r][0]
        results = check_row(row.instruction_id_list, row.kwargs or (), row.prompt, text)
        records.append(
            {
                "layer": points[p][0],
                "weight": points[p][1],
                "key": row.key,
                "response": text,
                "loose": [c.loose for c in results],
                "repetition": quality.repetition_rate(text),
                "perplexity": x,
                "degenerate": quality.is_degenerate(
                    text, x, max_repetition=MAX_REPETITION, min_perplexity=MIN_PERPLEXITY
                ),
            }
        )
    grid = [_grid_point(points[p], [records[i] for i, (q, _) in enumerate(index) if q == p],
                        max_degenerate) for p in range(len(points))]
    first = next(iter(files[needed[0]].values()))
    return SweepResult(
        instruction_id=instruction_id or group_of(usable[0][0]),
        model=lm.model_id,
        with_instruction=with_instruction,
        mode=mode or first.mode,
        grid=grid,
        chosen=choose(grid),
        rows=[str(row.key) for row, _ in usable],
        vector_ids=needed,
        max_new_tokens=sampling.max_new_tokens,
        responses=records,
    )


def _grid_point(
    point: tuple[int | None, float | None], records: Sequence[dict[str, Any]], max_degenerate: float
) -> GridPoint:
    passed = [all(r["loose"]) for r in records]
    degenerate = [bool(r["degenerate"]) for r in records]
    accuracy, score = score_point(passed, degenerate, max_degenerate=max_degenerate)
    measured = [r["perplexity"] for r in records if r["perplexity"] is not None]
    fluency = Fluency(
        repetition=statistics.fmean(r["repetition"] for r in records) if records else 0.0,
        perplexity=statistics.median(measured) if measured else None,
        degenerate=sum(degenerate) / len(degenerate) if degenerate else 0.0,
    )
    return GridPoint(point[0], point[1], accuracy, fluency, score, len(records))


def sweep_layers(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepResult:
    """The paper's layer sweep: "no steering" plus every layer of `range(L//5, L, 2)` held by
    the vector files (or `layers`), at the files' default weight, on the first `n_prompts`
    rows. Options as for `sweep`."""
    rows = list(rows)[:n_prompts] if n_prompts is not None else list(rows)
    mapping = _vector_map(vectors, rows)
    files = {v: load_vectors(p)[0] for v, p in mapping.items() if _serves_any(v, rows)}
    grid = _layers_for(files or {k: load_vectors(p)[0] for k, p in mapping.items()}, layers,
                       lm.n_layers)
    points: list[tuple[int | None, float | None]] = [(None, None)] + [(la, None) for la in grid]
    return sweep(lm, mapping, rows, points, **options)


def sweep_weights(
    lm: LoadedModel,
    vectors: VectorSource,
    rows: Sequence[Row],
    *,
    weights: Sequence[float],
    layers: Sequence[int] | None = None,
    n_prompts: int | None = None,
    **options: Any,
) -> SweepResult:
    """Layer × weight grid for additive vectors (length, keywords), plus "no steering".

    Weights are magnitudes as stored in the file (a forbidden word gets −w automatically);
    the mode is additive unless `mode` says otherwise. Options as for `sweep`.
    """
    if not weights:
        raise InvalidSteering("give at least one weight for a weight grid")
    rows = list(rows)[:n_prompts] if n_prompts is not None else list(rows)
    mapping = _vector_map(vectors, rows)
    files = {v: load_vectors(p)[0] for v, p in mapping.items() if _serves_any(v, rows)}
    grid = _layers_for(files or {k: load_vectors(p)[0] for k, p in mapping.items()}, layers,
                       lm.n_layers)
    points: list[tuple[int | None, float | None]] = [(None, None)]
    points += [(la, float(w)) for la in grid for w in weights]
    options.setdefault("mode", "additive")
    return sweep(lm, mapping, rows, points, **options)


def _serves_any(vector_id: str, rows: Sequence[Row]) -> bool:
    return any(vector_id in _served_ids(r) for r in rows)


# --- recording the choice -------------------------------------------------------------------


def group_vector_files(group: str, mapping: Mapping[str, str | Path]) -> dict[str, Path]:
    """The files a group's choice applies to: the group's own id, or its per-value vectors
    (`language:response_language` → every `language:response_language:<code>` file)."""
    return {
        vector_id: Path(path)
        for vector_id, path in mapping.items()
        if vector_id == group or vector_id.startswith(group + ":")
    }


def apply_choice(
    result: SweepResult, files: Sequence[str | Path] | Mapping[str, str | Path],
    *, set_default: bool = True,
) -> list[Path]:
    """Write a sweep's choice into vector files.

    A winning layer becomes the default layer (and a winning weight the default weight) unless
    `set_default` is False; either way `extra["sweep"]` (or `extra["sweep_with_instruction"]`
    for a sweep with the instruction in the prompt) records the choice, `recommended` and the
    best steered point. When "no steering" wins, the default layer stays as it was.
    """
    paths = list(files.values()) if isinstance(files, Mapping) else list(files)
    best = best_steered(result.grid)
    baseline = next((p for p in result.grid if p.layer is None), None)
    record = {
        "layer": result.chosen.layer,
        "weight": result.chosen.weight,
        "score": result.chosen.score,
        "recommended": result.chosen.recommended,
        "best_layer": None if best is None else best.layer,
        "best_weight": None if best is None else best.weight,
        "best_score": None if best is None else best.score,
        "no_steering_score": None if baseline is None else baseline.score,
        "with_instruction": result.with_instruction,
        "group": result.instruction_id,
        "n_prompts": len(result.rows),
        "max_new_tokens": result.max_new_tokens,
    }
    key = "sweep_with_instruction" if result.with_instruction else "sweep"
    write = set_default and result.chosen.recommended
    written = []
    for path in paths:
        written.append(
            update_defaults(
                path,
                layer=result.chosen.layer if write else None,
                weight=result.chosen.weight if write else None,
                extra={key: record},
            )
        )
    return written


def save_sweep(result: SweepResult, directory: str | Path, *, plot: bool = True) -> Path:
    """Write `<dir>/<id>.json` (grid and choice), `<id>.responses.jsonl` (every validation
    answer, for a look at what each layer did) and `<id>.png` (accuracy and fluency vs layer).
    The JSON is written last: its presence means the sweep is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = sweep_filename(result.instruction_id)
    with (directory / f"{stem}.responses.jsonl").open("w", encoding="utf-8") as handle:
        for record in result.responses:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    data = result.to_json()
    if plot:
        plot_sweep(data, directory / f"{stem}.png")
    target = directory / f"{stem}.json"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IfsteerError(f"{path}: not a readable sweep file ({exc})") from None
    if not isinstance(data, dict) or "grid" not in data or "chosen" not in data:
        raise IfsteerError(f"{path}: not a sweep file (no grid/chosen)")
    return data


# --- plots ----------------------------------------------------------------------------------


def draw_sweep(ax: Any, data: Mapping[str, Any], *, legend: bool = True) -> list[Any]:
    """Accuracy and the fluency-filtered score vs layer on `ax`, the degenerate share as bars on
    a twin axis. "No steering" sits at the left, at x "none", with a dashed line at its score
    (what a layer must beat); the chosen point is ringed. One accuracy line per weight.
    Returns the legend handles (of both axes)."""
    grid = data["grid"]
    steered = [p for p in grid if p["layer"] is not None]
    baseline = next((p for p in grid if p["layer"] is None), None)
    layers = sorted({p["layer"] for p in steered})
    gap = min((b - a for a, b in zip(layers, layers[1:], strict=False)), default=2)
    none_x = (layers[0] - gap) if layers else 0
    weights = sorted({p["weight"] for p in steered}, key=lambda w: (w is None, w or 0.0))
    colours = ["#1f77b4", "#9467bd", "#2ca02c", "#8c564b", "#e377c2", "#17becf"]
    for i, weight in enumerate(weights):
        points = sorted((p for p in steered if p["weight"] == weight), key=lambda p: p["layer"])
        label = "accuracy" if weight is None else f"accuracy, w={weight:g}"
        ax.plot([p["layer"] for p in points], [p["accuracy"] for p in points], "o-",
                color=colours[i % len(colours)], label=label)
        if len(weights) == 1:
            ax.plot([p["layer"] for p in points], [p["score"] for p in points], "s:",
                    color="#ff7f0e", label="score (fluency-filtered)", markersize=4)
    if baseline is not None:
        ax.axhline(baseline["score"], color="grey", linestyle="--", linewidth=1,
                   label="no steering (score)")
        ax.plot([none_x], [baseline["accuracy"]], "o", color="grey")
        ax.plot([none_x], [baseline["score"]], "s", color="#ff7f0e", markersize=4)
    chosen = data["chosen"]
    if chosen.get("layer") is not None:
        ax.plot([chosen["layer"]], [chosen["score"]], "o", markersize=14, fillstyle="none",
                color="crimson", label=f"chosen: layer {chosen['layer']}")
    ax.set_ylim(-0.05, 1.05)
    ticks = ([none_x] if baseline is not None else []) + layers
    ax.set_xticks(ticks)
    ax.set_xticklabels((["none"] if baseline is not None else []) + [str(la) for la in layers],
                       fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("loose accuracy")
    handles = ax.get_legend_handles_labels()[0]
    title = data["instruction_id"]
    if chosen.get("layer") is None:
        title += "  (no steering wins)"
    ax.set_title(title, fontsize=9)
    twin = ax.twinx()
    worst: dict[float, float] = {}
    for p in grid:
        x = none_x if p["layer"] is None else p["layer"]
        worst[x] = max(worst.get(x, 0.0), p["fluency"]["degenerate"])
    twin.bar(list(worst), list(worst.values()), width=0.4 * gap, alpha=0.18, color="red",
             label="degenerate share")
    twin.set_ylim(0, 1.0)
    twin.set_ylabel("degenerate share", color="#b22222", fontsize=8)
    twin.tick_params(axis="y", labelsize=7, colors="#b22222")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    handles += twin.get_legend_handles_labels()[0]
    if legend:
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    return handles


def plot_sweep(data: Mapping[str, Any], path: str | Path) -> Path:
    """One sweep as a PNG (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    try:
        draw_sweep(ax, data)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
