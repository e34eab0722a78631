"""Rebuild the calibrated vectors: extract, search, write one file per instruction.

    ifsteer vectors build                               # the embedded model, into the package
    ifsteer vectors build --model DIR --out my-vectors/
    ifsteer vectors build --groups format --trained     # then the paper's vector vs a trained one
    ifsteer vectors build --backend vllm --early-stop   # answers on vLLM, failures stopped early

Seeded and resumable: vectors are extracted from the extraction share of our base queries with
a fixed seed, generation is greedy, every scored response is logged (`--work`), and an
instruction whose file exists is skipped; so a stopped run continues where it was, and two runs
give the same files. Format instructions generate up to 256 tokens (the check must be
decidable), languages 96 (langdetect is settled long before), keywords 128.

`--backend vllm` makes the validation answers on vLLM and `--early-stop` stops a steered answer
whose check has failed for good (`run_search`); extraction, training and the judge stay on the
HF model. Each setting logs to its own files (`<id>.jsonl` for HF run to the end, as every
earlier build did; `<id>.vllm.jsonl`, `<id>.early.jsonl`, ...: `answers.setting_suffix`), and
the unsteered answers reused across instructions come from logs of the same setting only.

Keywords are calibrated as one class (PAPER.md §3): the search runs on one validation question
per word for ten words, each steered by its own word's vector, and every word the keyword test
sets need is then extracted at the chosen layer(s) and written with the class's point.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ifsteer.batcher import Batcher
from ifsteer.calibration.answers import made_as, setting_suffix
from ifsteer.calibration.point import Point, steerings_for
from ifsteer.calibration.scoring import search_log
from ifsteer.calibration.search import SearchResult, SearchSpace, run_search, verify_point
from ifsteer.checks import check
from ifsteer.datasets import keyword_words
from ifsteer.errors import IfsteerError
from ifsteer.generation import Sampling
from ifsteer.instructions import (
    FORMAT_INSTRUCTION_IDS,
    LANGUAGES,
    LENGTH_LEVELS,
    get_instruction,
    keyword_instruction,
)
from ifsteer.jobs import QueueFactory
from ifsteer.models import LoadedModel
from ifsteer.progress import Bars, silent
from ifsteer.quality import Fluency
from ifsteer.shipped import file_name, read_calibrated, write_calibrated
from ifsteer.training import TrainConfig, compete
from ifsteer.training.keyword_class import compete_class, ship_class
from ifsteer.validation import (
    ValidationPrompt,
    extraction_queries,
    keyword_validation,
    validation_prompts,
)
from ifsteer.vectors import SteeringVector, default_layer, extract_instruction
from ifsteer.vectors.records import Calibration, point_record

# Most promising first, so an interrupted build has shipped what matters most.
GROUPS = ("language", "format", "keywords", "length")
KEYWORD_CLASS = "keywords:existence"
TOKENS = {"format": 256, "language": 96, "keywords": 128, "length": 256}
N_PAIRS = {"format": 64, "language": 64, "keywords": 20, "length": 64}


def group_ids(group: str) -> list[str]:
    if group == "format":
        return list(FORMAT_INSTRUCTION_IDS)
    if group == "language":
        return [f"language:response_language:{code}" for code in LANGUAGES]
    if group == "length":
        return [f"length:{level}" for level in LENGTH_LEVELS]
    raise ValueError(group)


class Builder:
    """Builds one model's calibrated files into `out`, logging every answer under `work`.

    `engine` makes the validation answers (`Batcher`, or `OfflineVLLM.queue` with `backend`
    "vllm"), `early_stop` stops steered ones whose check has failed for good; both go into
    the logs' names (`setting_suffix`)."""

    def __init__(
        self,
        lm: LoadedModel,
        judge: LoadedModel | None,
        out: Path,
        work: Path,
        *,
        n_prompts: int,
        seed: int,
        batch_size: int,
        bars: Bars = silent,
        engine: QueueFactory = Batcher,
        backend: str = "hf",
        early_stop: bool = False,
    ) -> None:
        self.lm, self.judge, self.out, self.work = lm, judge, out, work
        self.n_prompts, self.seed, self.batch_size = n_prompts, seed, batch_size
        self.bars = bars  # for the trainings, which run for minutes each
        self.space = SearchSpace.coarse(lm.n_layers)
        self.fluency = Fluency()
        self.engine, self.early_stop = engine, early_stop
        self.setting = setting_suffix(backend, early_stop)

    def log_path(self, instruction_id: str) -> Path:
        """`<work>/<id>.jsonl`, with the setting in the name (`setting_suffix`)."""
        name = file_name(instruction_id).removesuffix(".safetensors")
        return self.work / f"{name}{self.setting}.jsonl"

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def extract(
        self, instruction_id: str, layers: Sequence[int], group: str
    ) -> dict[int, SteeringVector]:
        return extract_instruction(
            self.lm,
            get_instruction(instruction_id),
            layers,
            n_pairs=N_PAIRS[group],
            queries=extraction_queries(),
            seed=self.seed,
        )

    def search(
        self, instruction_id: str, prompts: Sequence[Any], vectors: Sequence[Any], group: str
    ) -> SearchResult:
        log = self.log_path(instruction_id)
        result = run_search(
            self.lm,
            instruction_id,
            prompts,
            vectors,
            self.space,
            judge=self.judge,
            fluency=self.fluency,
            sampling=Sampling(max_new_tokens=TOKENS[group]),
            log_path=log,
            batch_size=self.batch_size,
            engine=self.engine,
            early_stop=self.early_stop,
        )
        summary = result.to_json() | {"examples": result.examples}
        log.with_suffix(".summary.json").write_text(
            json.dumps(summary, indent=1, ensure_ascii=False)
        )
        c, b = result.chosen, result.baseline
        self.say(
            f"{instruction_id}: chosen {c.point.key} score {c.score:.2f} (acc {c.accuracy:.2f}), "
            f"no steering {b.score:.2f}; best steered {result.best.point.key} "
            f"{result.best.score:.2f}"
        )
        return result

    def status(self, instruction_id: str) -> str:
        path = self.out / file_name(instruction_id)
        if not path.is_file():
            return "missing"
        return read_calibrated(path).status

    def keywords_pending(self) -> None:
        """Pending files for every keyword word (one extraction each, 20 pairs)."""
        for word in keyword_words():
            self.pending(keyword_instruction(word).id, "keywords")

    def pending(self, instruction_id: str, group: str) -> None:
        """An uncalibrated file at the paper's setting (a third into the model, projection,
        c̄): costs one extraction, so every instruction ships before any search has run."""
        if self.status(instruction_id) != "missing":
            return
        layer = default_layer(self.lm.n_layers)
        vectors = self.extract(instruction_id, [layer], group)
        point = Point((layer,), get_instruction(instruction_id).mode, 1.0)
        record = point_record(
            status="pending",
            recommended=False,
            point=point.key,
            mode=point.mode,
            scale=point.scale,
            validation=None,
            paper_targets={layer: vectors[layer].target},
            seed=self.seed,
        )
        write_calibrated(
            self.out / file_name(instruction_id), steerings_for(point, vectors), record
        )

    def prefill_baseline(
        self, instruction_id: str, prompts: Sequence[ValidationPrompt], group: str
    ) -> None:
        """Unsteered answers depend on the query, not on the instruction checked: reuse those
        any earlier search of the same setting (engine, early stopping) logged for the same
        query and length, checked anew. (A training's unsteered answers, `answers-*.jsonl`,
        are no search's.)"""
        log = search_log(self.log_path(instruction_id))
        known: dict[str, dict[str, Any]] = {}
        for other in sorted(self.work.glob("*.jsonl")):
            if made_as(other) != self.setting or other.name.startswith("answers-"):
                continue
            for record in search_log(other).records.values():
                same = record.get("max_new_tokens") == TOKENS[group]
                if record["point"] == "none" and same and not record.get("with_instruction"):
                    known.setdefault(record["query"], record)
        fresh = []
        for i, p in enumerate(prompts):
            if ("none", i) in log.records or p.query not in known:
                continue
            verdict = check(p.check_id, p.kwargs, p.query, known[p.query]["response"])
            fresh.append(
                {**known[p.query], "prompt": i, "passed": verdict.loose, "strict": verdict.strict}
            )
        log.add(fresh)

    def instruction(
        self, instruction_id: str, group: str, donor: Point | None = None
    ) -> Point | None:
        """Search (or, given a donor point, verify) one instruction; returns its point."""
        wanted = "searched" if donor is None else "verified"
        path = self.out / file_name(instruction_id)
        status = self.status(instruction_id)
        if status == "searched" or status == wanted:
            return _point_of(read_calibrated(path).calibration)
        prompts = validation_prompts(instruction_id, self.n_prompts, seed=self.seed)
        self.prefill_baseline(instruction_id, prompts, group)
        if donor is None:
            vectors = self.extract(instruction_id, self.space.layers, group)
            result = self.search(instruction_id, prompts, [vectors] * len(prompts), group)
        else:
            vectors = self.extract(instruction_id, donor.layers, group)
            result = verify_point(
                self.lm,
                instruction_id,
                prompts,
                [vectors] * len(prompts),
                donor,
                judge=self.judge,
                fluency=self.fluency,
                sampling=Sampling(max_new_tokens=TOKENS[group]),
                log_path=self.log_path(instruction_id),
                batch_size=self.batch_size,
                engine=self.engine,
                early_stop=self.early_stop,
            )
            self.say(
                f"{instruction_id}: verified {donor.key} score {result.best.score:.2f}, "
                f"no steering {result.baseline.score:.2f}"
            )
        point = result.written.point
        record = result.record(vectors, self.space, self.seed, wanted)
        if donor is not None:
            record["search"] = {"verified_point_of_group": True}
        write_calibrated(path, steerings_for(point, vectors), record)
        return point

    def keywords(self) -> None:
        words = keyword_words()
        if all(self.status(keyword_instruction(w).id) == "searched" for w in words):
            return
        picked = keyword_validation(self.n_prompts, seed=self.seed)
        per_prompt = [
            self.extract(keyword_instruction(word).id, self.space.layers, "keywords")
            for word, _ in picked
        ]
        result = self.search(KEYWORD_CLASS, [p for _, p in picked], per_prompt, "keywords")
        point = result.written.point
        for word in words:
            instruction_id = keyword_instruction(word).id
            path = self.out / file_name(instruction_id)
            if self.status(instruction_id) == "searched":
                continue
            vectors = self.extract(instruction_id, point.layers, "keywords")
            record = result.record(vectors, self.space, self.seed)
            record["class"] = KEYWORD_CLASS
            write_calibrated(path, steerings_for(point, vectors), record)
        self.say(f"keywords: wrote {len(words)} word vectors at {point.key}")

    def run(
        self,
        groups: Sequence[str],
        only: Sequence[str] = (),
        quick: bool = False,
        pending_only: bool = False,
    ) -> None:
        """Pending files for everything first, then the searches in `groups` order.

        `quick` searches only the first instruction of a group and verifies its point on the
        others (languages share one; format ids are searched one by one unless quick).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        # Within a group, ids go in the order `only` gives them (the first is a quick donor).
        selected = {
            g: [i for i in only if i in group_ids(g)] if only else group_ids(g)
            for g in groups
            if g != "keywords"
        }
        for group, ids in selected.items():
            for instruction_id in ids:
                self.pending(instruction_id, group)
        if pending_only:
            if "keywords" in groups:
                self.keywords_pending()
            return
        for group in groups:
            if group == "keywords":
                if not only or KEYWORD_CLASS in only:
                    self.keywords()
                continue
            donor: Point | None = None
            for instruction_id in selected[group]:
                point = self.instruction(instruction_id, group, donor if quick else None)
                if donor is None and point is not None:
                    donor = point

    def trained(self, groups: Sequence[str], only: Sequence[str], config: TrainConfig) -> None:
        """The paper's vector against a trained one for every searched instruction of
        `groups`; for the keywords, as a class (`training.keyword_class`)."""
        for group in groups:
            if group == "keywords":
                if not only or KEYWORD_CLASS in only:
                    self.trained_keywords(config)
                continue
            members = group_ids(group)
            for instruction_id in [i for i in only if i in members] if only else members:
                if self.status(instruction_id) in ("missing", "pending"):
                    continue
                contest = compete(
                    self.lm,
                    instruction_id,
                    self.out / file_name(instruction_id),
                    self.work,
                    config,
                    judge=self.judge,
                    fluency=self.fluency,
                    sampling=Sampling(max_new_tokens=TOKENS[group]),
                    n_prompts=self.n_prompts,
                    seed=self.seed,
                    batch_size=self.batch_size,
                    bars=self.bars,
                    engine=self.engine,
                    early_stop=self.early_stop,
                    setting=self.setting,
                )
                if contest is not None:
                    self.say(contest.summary())

    def trained_keywords(self, config: TrainConfig) -> None:
        """The class competition on the validation words, then (where trained won) a
        trained vector for every shipped word, one at a time."""
        words = [w for w in keyword_words() if self.status(keyword_instruction(w).id) == "searched"]
        if not words:
            return
        files = [self.out / file_name(keyword_instruction(w).id) for w in words]
        contest = compete_class(
            self.lm,
            KEYWORD_CLASS,
            keyword_validation(self.n_prompts, seed=self.seed),
            files,
            self.work,
            config,
            bars=self.bars,
            setting=self.setting,
            judge=self.judge,
            fluency=self.fluency,
            sampling=Sampling(max_new_tokens=TOKENS["keywords"]),
            batch_size=self.batch_size,
            engine=self.engine,
            early_stop=self.early_stop,
        )
        if contest is not None:
            self.say(contest.summary())
        switched = ship_class(self.lm, words, self.out, self.work, bars=self.bars)
        if switched:
            self.say(f"keywords: {switched} word files now ship their trained vector")


def _point_of(calibration: Calibration) -> Point:
    """The search's point a file records (its layers, mode, target scale and positions)."""
    if calibration.layers is None or calibration.scale is None:
        raise IfsteerError(f"a calibrated file records no searched point ({calibration.point})")
    return Point(calibration.layers, calibration.mode, calibration.scale, calibration.positions)
