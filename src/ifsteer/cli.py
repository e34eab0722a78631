"""The `ifsteer` command line.

Every command turns an `IfsteerError` into one line on stderr and exit code 2, so a wrong model,
a layer out of range or a malformed file never shows a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ifsteer.errors import IfsteerError, InvalidSteering

app = typer.Typer(
    help="Make language models follow instructions better by activation steering.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
vectors_app = typer.Typer(help="Inspect and convert vector files.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors")
out = Console()

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Embedded model name, local Hugging Face directory, or .gguf file."
    ),
]
DtypeOption = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
T = TypeVar("T")


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        app()
    except IfsteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _load(model: str, dtype: str) -> Any:
    from transformers.utils import logging as hf_logging

    from ifsteer.models import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with out.status(f"loading {model}…"):
        return load_model(model, dtype)


def _csv_ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidSteering(f"--layers takes comma-separated integers, got {text!r}") from None


@app.command()
def extract(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Vector file to write.")],
    instruction: Annotated[
        str | None, typer.Option(help="Instruction text (free text, or one more phrasing).")
    ] = None,
    instruction_id: Annotated[
        str | None, typer.Option(help="Catalogue id (see `ifsteer instructions`).")
    ] = None,
    model: ModelOption = "smollm2-135m-instruct",
    layer: Annotated[int | None, typer.Option(help="Default layer stored in the file.")] = None,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers to extract (default: paper grid).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="Default mode: projection | additive.")] = None,
    n_pairs: Annotated[int, typer.Option(help="Prompt pairs (with / without).")] = 64,
    queries: Annotated[
        Path | None, typer.Option(help="Base queries: text file or jsonl (default: ours).")
    ] = None,
    batch_size: int = 16,
    dtype: DtypeOption = "float32",
) -> None:
    """Extract an instruction's steering vector from prompt pairs with and without it."""
    from ifsteer.instructions import custom_instruction, get_instruction
    from ifsteer.progress import progress_bar
    from ifsteer.prompts import BASE_QUERIES, load_queries
    from ifsteer.vectors import default_layer, default_layers, extract_instruction, save_vectors

    spec = _instruction(instruction, instruction_id, mode, custom_instruction, get_instruction)
    lm = _load(model, dtype)
    wanted = _csv_ints(layers) or default_layers(lm.n_layers)
    chosen = default_layer(lm.n_layers) if layer is None else layer
    wanted = sorted({*wanted, chosen})
    base = load_queries(queries) if queries else BASE_QUERIES
    with progress_bar(f"extract {spec.id}", 2 * n_pairs) as advance:
        vectors = extract_instruction(
            lm,
            spec,
            wanted,
            n_pairs=n_pairs,
            queries=base,
            batch_size=batch_size,
            progress=advance,
        )
    save_vectors(out_path, list(vectors.values()), default=chosen)
    v = vectors[chosen]
    out.print(
        f"wrote {out_path}: {spec.id} on {lm.model_id}, layers {wanted}, default layer {chosen} "
        f"({v.mode}, weight {v.weight:.3g}, ‖u‖={v.norm:.3g}, c̄={v.target:.3g})"
    )


def _instruction(
    text: str | None,
    instruction_id: str | None,
    mode: str | None,
    custom: Callable[..., Any],
    lookup: Callable[[str], Any],
) -> Any:
    """Catalogue phrasings when the id is known, plus the user's text as the first phrasing."""
    from dataclasses import replace

    from ifsteer.errors import UnknownInstruction

    if text is None and instruction_id is None:
        raise InvalidSteering("give --instruction TEXT, --instruction-id ID, or both")
    known = None
    if instruction_id is not None:
        try:
            known = lookup(instruction_id)
        except UnknownInstruction:
            if text is None:
                raise
    if known is None:
        spec = custom(text, instruction_id, mode or "projection")
    elif text is None:
        spec = known
    else:
        rest = tuple(p for p in known.phrasings if p != text)
        spec = replace(known, phrasings=(text, *rest))
    if mode is not None:
        if mode not in ("projection", "additive"):
            raise InvalidSteering(f"unknown mode {mode!r}; choose projection or additive")
        spec = replace(spec, mode=mode)
    return spec


def parse_vector_spec(spec: str) -> tuple[str, str | None, float | None]:
    """`PATH[:mode[:weight]]` (also `PATH:weight`) into its parts."""
    parts = spec.split(":")
    path, mode, weight = parts[0], None, None
    for part in parts[1:]:
        if part in ("projection", "additive"):
            mode = part
            continue
        try:
            weight = float(part)
        except ValueError:
            raise InvalidSteering(
                f"cannot read {spec!r}: expected PATH[:projection|additive[:WEIGHT]]"
            ) from None
        if not math.isfinite(weight):
            raise InvalidSteering(f"weight in {spec!r} must be finite")
    return path, mode, weight


@app.command()
def generate(
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt text (repeatable).")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts, one a line (or jsonl with 'prompt').")
    ] = None,
    vector: Annotated[
        list[str] | None,
        typer.Option("--vector", "-v", help="PATH[:mode[:weight]] (repeatable; vectors compose)."),
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Apply every vector at this layer.")] = None,
    no_steer: Annotated[bool, typer.Option("--no-steer", help="Unsteered only.")] = False,
    baseline: Annotated[
        bool, typer.Option(help="Show the unsteered answer next to the steered one.")
    ] = True,
    model: ModelOption = "smollm2-135m-instruct",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    batch_size: int = 8,
    allow_transfer: Annotated[
        bool, typer.Option(help="Apply vectors extracted from another model of equal size.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    dtype: DtypeOption = "float32",
) -> None:
    """Generate with steering vectors, next to the unsteered answer."""
    from ifsteer.generation import Sampling
    from ifsteer.generation import generate as run
    from ifsteer.progress import progress_bar
    from ifsteer.prompts import load_queries
    from ifsteer.steering import Steering, check_steering
    from ifsteer.vectors import load_vector

    texts = list(prompt or []) + (load_queries(prompts_file) if prompts_file else [])
    if not texts:
        raise InvalidSteering("give at least one --prompt or a --prompts-file")
    steering = []
    for spec in [] if no_steer else vector or []:
        path, mode, weight = parse_vector_spec(spec)
        steering.append(Steering(load_vector(path, layer), mode=mode, weight=weight))  # type: ignore[arg-type]
    lm = _load(model, dtype)
    check_steering(lm, steering, allow_transfer=allow_transfer)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    runs = {"steered": steering} if steering else {}
    if not steering or baseline:
        runs = {"unsteered": [], **runs}
    results = {}
    with progress_bar("generate", len(texts) * len(runs)) as advance:
        for name, steer_with in runs.items():
            results[name] = run(
                lm,
                texts,
                steering=steer_with,
                sampling=sampling,
                batch_size=batch_size,
                allow_transfer=allow_transfer,
                progress=advance,
            )
    _show_generations(texts, results, as_json)


def _show_generations(texts: Sequence[str], results: dict[str, list[Any]], as_json: bool) -> None:
    if as_json:
        for i, text in enumerate(texts):
            print(json.dumps({"prompt": text, **{k: v[i].text for k, v in results.items()}}))
        return
    table = Table(show_lines=True)
    table.add_column("prompt", style="cyan", max_width=30)
    for name in results:
        table.add_column(name)
    for i, text in enumerate(texts):
        table.add_row(text, *(v[i].text for v in results.values()))
    out.print(table)


@vectors_app.command("show")
def vectors_show(path: Path, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Metadata of a vector file: model, layers, instruction, defaults."""
    from ifsteer.vectors import describe, load_vectors

    vectors, default = load_vectors(path)
    info = describe(vectors[default])
    info["default_layer"] = default
    info["layers"] = {
        layer: {"norm": v.norm, "target": v.target} for layer, v in sorted(vectors.items())
    }
    del info["layer"], info["norm"], info["target"]
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(path), show_header=False)
    for key, value in info.items():
        if key == "layers":
            value = ", ".join(
                f"{k} (‖u‖ {v['norm']:.3g}, c̄ {v['target']:.3g})" for k, v in value.items()
            )
        elif key == "phrasings":
            value = "\n".join(value)
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def models() -> None:
    """Models available offline: embedded ones and whether their cache is ready."""
    from ifsteer.models import EMBEDDED_MODELS, cache_dir

    table = Table()
    for column in ("name", "package", "cached", "description"):
        table.add_column(column)
    for m in EMBEDDED_MODELS.values():
        cached = (cache_dir(m.name) / "config.json").is_file()
        table.add_row(m.name, m.package, "yes" if cached else "on first use", m.description)
    out.print(table)
    out.print("Any local Hugging Face directory or .gguf file also works: --model PATH")


@app.command()
def instructions() -> None:
    """The built-in instruction catalogue (free-text instructions work too)."""
    from ifsteer.instructions import list_instructions

    table = Table()
    for column in ("id", "mode", "canonical phrasing"):
        table.add_column(column)
    for ins in list_instructions():
        table.add_row(ins.id, ins.mode, ins.phrasings[0])
    out.print(table)
    out.print('Also: keywords:existence:<word>, or --instruction "any text" for your own.')


# --- evaluation commands (evaluation.py, calibration.py, report.py) ---


def _eval_assignments(
    values: list[str] | None, option: str, cast: Callable[[str], T]
) -> dict[str, T]:
    """`ID=VALUE` options (ID may be a glob such as `keywords:*`) into a dict."""
    parsed: dict[str, T] = {}
    for item in values or []:
        key, sep, raw = item.rpartition("=")
        try:
            if not sep or not key:
                raise ValueError
            parsed[key] = cast(raw)
        except ValueError:
            raise InvalidSteering(f"{option} takes ID=VALUE, got {item!r}") from None
    return parsed


def _eval_finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError
    return value


def _eval_mode(text: str) -> str:
    if text not in ("projection", "additive"):
        raise ValueError
    return text


_EVAL_LABELS = {
    "no_instruction": "no instr",
    "steer": "steer",
    "instruction": "instr",
    "instruction_steer": "instr+steer",
}


def _eval_cell(stat: dict[str, Any], interval: bool = False) -> str:
    if stat.get("mean") is None:
        return "–"
    if not interval:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ({stat['low']:.2f}–{stat['high']:.2f})"


def _eval_number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _eval_tables(summary: dict[str, Any], experiment: str) -> None:
    """Our four settings (95% interval on the headline metric), then the paper's beside ours."""
    from rich import box

    from ifsteer.evaluation import HEADLINE_METRIC, PAPER_RESULTS, SETTINGS

    result = summary["experiments"].get(experiment)
    if not result:
        return
    settings = result["settings"]
    metric = HEADLINE_METRIC.get(experiment, "prompt_loose")
    other = "prompt_strict" if metric == "prompt_loose" else "prompt_loose"
    extra = [
        (name, key)
        for name, key in (("sent.", "sentences"), ("judge", "judge"))
        if any(s.get(key) is not None for s in settings.values())
        and (key == "judge" or experiment in ("length", "composition"))
    ]
    table = Table(
        title=f"{experiment} · {summary['model']} · {result['n_rows']} rows", box=box.SIMPLE
    )
    kind = metric.removeprefix("prompt_")
    table.add_column("setting", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column(f"{kind} (95% CI)", justify="right", no_wrap=True)
    for column in (
        other.removeprefix("prompt_"),
        "instr.",
        "degen",
        "ppl",
        *(name for name, _ in extra),
        "s",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    table.caption = (
        f"prompt-level accuracy; instr. = instruction-level {kind}; degen = share degenerate; "
        "ppl = median perplexity; s = seconds"
    )
    for name, s in settings.items():
        fluency = s["fluency"]
        note = f" ({s['n_unsteered']} unsteered)" if s.get("n_unsteered") else ""
        table.add_row(
            _EVAL_LABELS.get(name, name) + note,
            str(s["n"]),
            _eval_cell(s[metric], interval=True),
            _eval_cell(s[other]),
            _eval_cell(s[f"instruction_{kind}"]),
            _eval_number(fluency["degenerate"]),
            _eval_number(fluency["perplexity"]),
            *(_eval_number(s.get(key)) for _, key in extra),
            f"{s['seconds']:.0f}",
        )
    out.print(table)
    paper = PAPER_RESULTS.get("format" if experiment == "transfer" else experiment)
    if not paper:
        return
    side = Table(
        title=f"{metric.replace('_', ' ')}: ours beside the paper's (PAPER.md §6)", box=box.SIMPLE
    )
    side.add_column("model")
    for name in SETTINGS:
        side.add_column(_EVAL_LABELS[name], justify="right")
    ours = [settings.get(name, {}).get(metric, {}).get("mean") for name in SETTINGS]
    side.add_row(
        f"ours: {summary['model']} (n={result['n_rows']})",
        *(_eval_number(v, 3) for v in ours),
    )
    for model_name, values in paper.items():
        side.add_row(f"paper: {model_name}", *(f"{v:.3f}" for v in values))
    out.print(side)


@app.command("eval")
def eval_command(
    data: Annotated[
        Path,
        typer.Option(
            help="IFEval-format jsonl: prompt, prompt_without_instruction, "
            "instruction_id_list, kwargs."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (responses.jsonl, summary.json); rerun into it to resume.",
        ),
    ],
    vectors: Annotated[
        Path | None, typer.Option(help="Directory of vector files, matched by instruction id.")
    ] = None,
    model: ModelOption = "smollm2-135m-instruct",
    experiment: Annotated[
        str,
        typer.Option(
            help="format | keywords_include | keywords_exclude | length | composition | transfer."
        ),
    ] = "format",
    settings: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of no_instruction,steer,instruction,"
            "instruction_steer (default: all four)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    allow_transfer: Annotated[
        bool, typer.Option(help="Accept vectors of another model with the same hidden size.")
    ] = False,
    weight: Annotated[
        list[str] | None,
        typer.Option(
            help="ID=W: weight override by vector id or glob (repeatable); excluded words get -W."
        ),
    ] = None,
    mode: Annotated[
        list[str] | None, typer.Option(help="ID=projection|additive override (repeatable).")
    ] = None,
    perplexity: Annotated[
        bool, typer.Option(help="Score each response's perplexity (unsteered).")
    ] = True,
    fluency_model: Annotated[
        str | None,
        typer.Option(
            help="Score perplexity under this model instead (e.g. gemma-3-270m); "
            "only then does perplexity < 2.5 flag a response as degenerate."
        ),
    ] = None,
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint of an LLM quality judge.")
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help="Model name to ask the judge for.")
    ] = None,
    judge_api_key: Annotated[
        str | None, typer.Option(envvar="IFSTEER_JUDGE_API_KEY", help="Bearer token for the judge.")
    ] = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Evaluate the four settings (no instruction, steer, instruction, instruction + steer)."""
    import logging

    from ifsteer.evaluation import (
        SETTINGS,
        count_pending,
        load_rows,
        prepare_rows,
        run_evaluation,
        vector_directory,
    )
    from ifsteer.generation import Sampling
    from ifsteer.progress import progress_bar
    from ifsteer.quality import Judge

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    chosen = [s.strip() for s in settings.split(",") if s.strip()] if settings else list(SETTINGS)
    if (judge_url is None) != (judge_model is None):
        raise InvalidSteering("give --judge-url and --judge-model together")
    judge = None if judge_url is None else Judge(judge_url, str(judge_model), judge_api_key)
    weights = _eval_assignments(weight, "--weight", _eval_finite)
    modes = _eval_assignments(mode, "--mode", _eval_mode)
    rows = prepare_rows(load_rows(data, limit), experiment)
    found = vector_directory(vectors) if vectors is not None else None
    pending = count_pending(out_dir, rows, experiment=experiment, settings=chosen)
    lm = _load(model, dtype)
    scorer = _load(fluency_model, dtype) if fluency_model and perplexity else None
    with progress_bar(f"eval {experiment}", pending) as advance:
        summary = run_evaluation(
            lm,
            rows,
            found,
            out_dir,
            settings=chosen,
            experiment=experiment,
            sampling=Sampling(max_new_tokens=max_new_tokens),
            batch_size=batch_size,
            allow_transfer=allow_transfer,
            weights=weights,
            modes=modes,  # type: ignore[arg-type]
            judge=judge,
            perplexity=perplexity,
            fluency_lm=scorer,
            progress=advance,
        )
    if summary.missing_vectors:
        out.print(
            f"[yellow]no vector file for {len(summary.missing_vectors)} ids "
            f"({', '.join(summary.missing_vectors)}): those rows ran unsteered[/yellow]"
        )
    _eval_tables(summary.data, experiment)
    out.print(
        f"{summary.generated} new responses, {summary.skipped} already on disk; "
        f"wrote {summary.responses_path} and {summary.summary_path}"
    )


def _csv_floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidSteering(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise InvalidSteering(f"{option} takes finite numbers, got {text!r}")
    return values


def _sweep_table(result: Any) -> Table:
    table = Table(
        title=f"sweep {result.instruction_id} · {len(result.rows)} prompts · "
        f"{'with' if result.with_instruction else 'without'} the instruction"
    )
    for column in ("layer", "weight", "loose acc.", "score", "repetition", "degenerate", "ppl"):
        table.add_column(column, justify="right")
    for p in result.grid:
        chosen = (p.layer, p.weight) == (result.chosen.layer, result.chosen.weight)
        table.add_row(
            ("none" if p.layer is None else str(p.layer)) + (" ←" if chosen else ""),
            "–" if p.weight is None else f"{p.weight:g}",
            f"{p.accuracy:.2f}",
            f"{p.score:.2f}",
            f"{p.fluency.repetition:.2f}",
            f"{p.fluency.degenerate:.2f}",
            "–" if p.fluency.perplexity is None else f"{p.fluency.perplexity:.2f}",
        )
    return table


@app.command("sweep")
def sweep_command(
    vectors: Annotated[
        Path, typer.Argument(help="A vector file, or a directory of them (one sweep each).")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Validation rows (IFEval-format jsonl); the first --n-prompts rows "
            "of each instruction are used."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where sweep JSON/PNG go (default: sweeps/ next to the vectors)."
        ),
    ] = None,
    instruction_id: Annotated[
        str | None, typer.Option(help="Sweep only this instruction (IFEval id).")
    ] = None,
    n_prompts: Annotated[int, typer.Option(help="Validation prompts per instruction.")] = 4,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layers (default: range(L//5, L, 2)).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated weights: a layer × weight grid (additive vectors)."),
    ] = None,
    with_instruction: Annotated[
        bool, typer.Option(help="Keep the instruction text in the prompt while sweeping.")
    ] = False,
    set_default: Annotated[
        bool, typer.Option(help="Write the winning layer/weight as the file's default.")
    ] = True,
    perplexity: Annotated[
        bool, typer.Option(help="Also flag answers the model finds too predictable (ppl < 2.5).")
    ] = False,
    model: ModelOption = "smollm2-135m-instruct",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    dtype: DtypeOption = "float32",
) -> None:
    """Choose each vector's layer (and weight) on validation prompts; write it into the file."""
    from ifsteer.calibration import (
        apply_choice,
        group_of,
        group_vector_files,
        save_sweep,
        sweep_layers,
        sweep_weights,
    )
    from ifsteer.evaluation import load_rows, vector_directory
    from ifsteer.generation import Sampling
    from ifsteer.instructions import vector_id_for
    from ifsteer.progress import progress_bar
    from ifsteer.vectors import default_layers, load_vectors

    if data is None:
        raise InvalidSteering(
            "give --data PATH: validation rows in IFEval format, e.g. "
            "--data ../shared/data/ifeval_single_instr_format.jsonl (format, languages) or "
            "../shared/data/inclusion_validation.jsonl (keywords)"
        )
    if n_prompts < 1:
        raise InvalidSteering("--n-prompts must be at least 1")
    if vectors.is_dir():
        mapping = vector_directory(vectors)
    else:
        loaded, default = load_vectors(vectors)
        mapping = {loaded[default].instruction_id: vectors}

    def served(row: Any) -> list[str]:
        ids: list[str] = []
        for iid, kwargs in zip(
            row.instruction_id_list, row.kwargs or ({},) * len(row.instruction_id_list), strict=True
        ):
            try:
                found = vector_id_for(iid, kwargs)
            except IfsteerError:
                return []
            ids += [found] if isinstance(found, str) else found
        return ids

    groups: dict[str, list[Any]] = {}
    for row in load_rows(data):
        ids = served(row)
        if (
            ids
            and all(i in mapping for i in ids)
            and len(groups.get(group_of(row), [])) < (n_prompts)
        ):
            groups.setdefault(group_of(row), []).append(row)
    if instruction_id is not None:
        groups = {g: rows for g, rows in groups.items() if g == instruction_id}
    if not groups:
        raise InvalidSteering(
            f"no row of {data} has an instruction served by the vectors in {vectors} "
            f"({', '.join(sorted(mapping))})"
        )
    grid_layers = _csv_ints(layers)
    grid_weights = _csv_floats(weights, "--weights")
    target = out_dir or (vectors if vectors.is_dir() else vectors.parent).parent / "sweeps"
    lm = _load(model, dtype)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for group, rows in sorted(groups.items()):
        n_points = 1 + (len(grid_layers or default_layers(lm.n_layers))) * (
            len(grid_weights) if grid_weights else 1
        )
        with progress_bar(f"sweep {group}", len(rows) * n_points) as advance:
            options: dict[str, Any] = dict(
                layers=grid_layers,
                instruction_id=group,
                with_instruction=with_instruction,
                sampling=sampling,
                batch_size=batch_size,
                perplexity=perplexity,
                progress=advance,
            )
            if grid_weights:
                result = sweep_weights(lm, mapping, rows, weights=grid_weights, **options)
            else:
                result = sweep_layers(lm, mapping, rows, **options)
        files = {**group_vector_files(group, mapping), **{v: mapping[v] for v in result.vector_ids}}
        apply_choice(result, files, set_default=set_default)
        written = save_sweep(result, target)
        out.print(_sweep_table(result))
        verdict = (
            f"layer {result.chosen.layer}"
            + ("" if result.chosen.weight is None else f", weight {result.chosen.weight:g}")
            if result.chosen.recommended
            else "no steering: no layer beat the unsteered model (recorded as not recommended)"
        )
        out.print(f"{group}: {verdict}; updated {len(files)} vector file(s), wrote {written}")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with summary.json.")],
) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/figures/*.png."""
    from ifsteer.report import render_report

    with out.status("rendering report…"):
        path = render_report(run_dir)
    out.print(f"wrote {path}")


def _minutes_text(seconds: float) -> str:
    return "under a minute" if seconds < 60 else f"{seconds / 60:.0f} min"


@app.command("run-paper")
def run_paper_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory (resumable).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="IFEval format set, e.g. ../shared/data/ifeval_single_instr_format.jsonl"
        ),
    ] = None,
    model: ModelOption = "smollm2-135m-instruct",
    limit: Annotated[
        int, typer.Option(help="Evaluation rows, spread over all instructions; 0 = all.")
    ] = 80,
    sweep_prompts: Annotated[
        int, typer.Option(help="Validation rows per instruction for its layer sweep.")
    ] = 3,
    layer_step: Annotated[
        int, typer.Option(help="Sweep every Nth layer of range(L//5, L) (the paper: 2).")
    ] = 2,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    n_pairs: Annotated[int, typer.Option(help="Prompt pairs per vector.")] = 32,
    with_instruction: Annotated[
        bool, typer.Option(help="Sweep with the instruction text in the prompt.")
    ] = False,
    perplexity: Annotated[
        bool,
        typer.Option(
            help="Also score answers' perplexity under the model (slower; flags "
            "ppl < 2.5 as degenerate)."
        ),
    ] = False,
    dtype: DtypeOption = "float32",
) -> None:
    """The paper's format experiment end to end: extract, sweep, evaluate, report."""
    import logging

    from ifsteer.pipeline import (
        PaperConfig,
        RichStages,
        estimate_seconds,
        full_command,
        full_config,
        full_plan,
        plan_run,
        run_paper,
    )

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    if data is None:
        raise InvalidSteering(
            "give --data PATH to IFEval's single-instruction format set, e.g. "
            "--data ../shared/data/ifeval_single_instr_format.jsonl"
        )
    if limit < 0 or sweep_prompts < 0 or max_new_tokens < 1 or batch_size < 1 or n_pairs < 1:
        raise InvalidSteering("--limit and --sweep-prompts must be ≥ 0, the other sizes ≥ 1")
    config = PaperConfig(
        data=data,
        out=out_dir,
        model=model,
        limit=limit or None,
        sweep_prompts=sweep_prompts,
        layer_step=layer_step,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        n_pairs=n_pairs,
        with_instruction=with_instruction,
        perplexity=perplexity,
        dtype=dtype,
    )
    lm = _load(model, dtype)
    plan = plan_run(config, lm.n_layers)
    n_params = sum(p.numel() for p in lm.model.parameters())
    estimates = estimate_seconds(config, plan, n_params, todo=True)
    full_total = sum(
        estimate_seconds(
            full_config(config), full_plan(config, plan, lm.n_layers), n_params
        ).values()
    )
    big = {k: v for k, v in estimates.items() if v >= 30}
    out.print(
        f"run-paper {lm.model_id}: {len(plan.vector_ids)} vectors, "
        f"{len(plan.groups)} sweeps × layers {plan.sweep_layers} + no steering "
        f"({plan.sweep_generations} answers), {len(plan.evaluation)} evaluation rows × 4 "
        f"settings ({plan.eval_generations} answers), {max_new_tokens} new tokens each.\n"
        f"Estimated time left: about {_minutes_text(sum(estimates.values()))}"
        + (f" ({', '.join(f'{k} {v / 60:.0f}' for k, v in big.items())} min)" if big else "")
        + ".\n"
        f"Full set (all held-out rows, 256 tokens, 64 pairs), about "
        f"{full_total / 3600:.1f} h here:\n  {full_command(config)}"
    )
    stages = RichStages()
    stages.start(estimates)
    try:
        report = run_paper(lm, config, stages=stages, plan=plan)
    finally:
        stages.stop()
    out.print(f"done: open {report}")


# --- serving commands (server.py) ---


@app.command()
def serve(
    model: ModelOption = "smollm2-135m-instruct",
    vectors: Annotated[
        Path | None,
        typer.Option(help="Directory of vector files, each named by its file stem."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it local.")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="IFSTEER_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests generated as one batch.")] = 32,
    batch_window_ms: Annotated[
        float, typer.Option(help="Longest gap between requests that join one batch.")
    ] = 20.0,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted.")] = 4096,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens accepted.")] = 1024,
    extract_pairs: Annotated[
        int, typer.Option(help="Prompt pairs for an instruction extracted on request.")
    ] = 64,
    allow_transfer: Annotated[
        bool, typer.Option(help="Apply vectors extracted from another model of equal size.")
    ] = False,
    backend: Annotated[str, typer.Option(help="hf (this process) | vllm (GPU, extra).")] = "hf",
    tensor_parallel_size: Annotated[int, typer.Option(help="vLLM only: GPUs per replica.")] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(help="vLLM only: pipeline stages.")] = 1,
    dtype: DtypeOption = "float32",
) -> None:
    """Serve an OpenAI-compatible API whose requests can carry a `steering` field."""
    from ifsteer.server import Limits, build_app, create_app, load_vector_dir
    from ifsteer.server import serve as run_server

    named = load_vector_dir(vectors) if vectors else {}
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit)
    if backend == "hf":
        lm = _load(model, dtype)
        application = create_app(
            lm,
            named,
            api_key=api_key,
            batch_window_s=batch_window_ms / 1000,
            max_batch_size=max_batch_size,
            limits=limits,
            allow_transfer=allow_transfer,
            extract_pairs=extract_pairs,
        )
    elif backend == "vllm":
        from ifsteer.backends.vllm import VLLMEngine

        engine = VLLMEngine(
            model,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            dtype=dtype,
        )
        application = build_app(
            engine, named, api_key=api_key, limits=limits, allow_transfer=allow_transfer
        )
    else:
        raise InvalidSteering(f"unknown backend {backend!r}; choose hf or vllm")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    out.print(
        f"serving on http://{host}:{port}/v1 with {len(named)} vectors "
        f"({', '.join(sorted(named)) or 'none'})"
    )
    run_server(application, host=host, port=port)


@vectors_app.command("export-gguf")
def vectors_export_gguf(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="ifsteer vector file.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="GGUF file to write.")],
    layer: Annotated[
        int | None, typer.Option(help="Layer to export (default: the file's default layer).")
    ] = None,
    weight: Annotated[
        float | None, typer.Option(help="Weight in the vector's own mode (default: stored).")
    ] = None,
) -> None:
    """Write a vector as a llama.cpp control vector (use with --control-vector)."""
    from ifsteer.gguf_export import additive_coefficient, to_gguf
    from ifsteer.vectors import load_vector

    vector = load_vector(path, layer)
    if weight is not None:
        if not math.isfinite(weight):
            raise InvalidSteering(f"--weight must be finite, got {weight}")
        vector = vector.with_defaults(weight=weight)
    to_gguf([vector], out_path)
    how = "additive" if vector.mode == "additive" else "projection as its additive equivalent"
    out.print(
        f"wrote {out_path}: direction.{vector.layer} = {additive_coefficient(vector):.4g}·û "
        f"({how}); llama.cpp: --control-vector {out_path}"
    )


if __name__ == "__main__":
    main()
