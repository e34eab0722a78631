"""Calibrated points served the same way everywhere (`ifsteer.shipped.points`).

A multi-layer, generated-only point is written with `write_calibrated` from tiny-model vectors,
as a trained vector will be; `generate -i`, `eval --shipped`, `eval --vectors`, the HF server
and the vLLM engine's wire format must all steer with exactly `ShippedVector.steerings()`. An id
with no file gets its group's point, extracted once, cached under $IFSTEER_HOME and labelled
unverified. Servers run for real on loopback, as in test_server.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from ifsteer.backends.vllm.engine import steering_args
from ifsteer.calibration import Point, steerings_for
from ifsteer.cli import main
from ifsteer.evaluation import plan_vectors
from ifsteer.generation import Completion, Sampling, generate
from ifsteer.instructions import get_instruction
from ifsteer.jobs import Job
from ifsteer.prompts import build_pairs
from ifsteer.rows import Row
from ifsteer.server import Limits, build_app, create_app, load_vector_dir
from ifsteer.shipped import (
    ShippedVector,
    file_name,
    read_calibrated,
    recommended_files,
    write_calibrated,
)
from ifsteer.shipped.points import GroupPoint, Points, instruction_for
from ifsteer.steering import Steering
from ifsteer.vectors import extract_instruction, extract_vectors
from tests.unit.test_server import Running, _free_port

TITLE = "detectable_format:title"
GERMAN = "language:response_language:de"
FRENCH = "language:response_language:fr"  # no file ships: the language group's point
PROMPT = "Describe a forest at dawn."
TOKENS = 6
LIMITS = Limits(max_prompt_tokens=96, max_tokens=32, default_max_tokens=TOKENS)


def signature(steerings: list[Steering]) -> list[tuple[Any, ...]]:
    """What `steer` applies, comparable: layer, mode, weight, positions, target, direction."""
    return [
        (
            s.vector.layer,
            s.effective_mode,
            round(s.effective_weight, 5),
            s.positions,
            round(s.vector.target, 4),
            tuple(round(x, 5) for x in s.vector.direction.tolist()),
        )
        for s in steerings
    ]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, tiny_lm) -> Path:
    """A model's shipped folder: title at a trained-like point (additive at layers 1 and 3,
    own weights, generated tokens only) and German at projection scale 2, layer 2."""
    folder = tmp_path_factory.mktemp("shipped")
    pairs = build_pairs(get_instruction(TITLE), 4, seed=0)
    title = extract_vectors(tiny_lm, pairs, [1, 3], instruction="t", instruction_id=TITLE)
    point = [
        Steering(title[1], mode="additive", weight=3.0, positions="generated"),
        Steering(title[3], mode="additive", weight=5.0, positions="generated"),
    ]
    write_calibrated(
        folder / file_name(TITLE),
        point,
        {
            "status": "searched",
            "method": "trained",
            "recommended": True,
            "point": "L1+3:additive:trained:generated",
            "validation": {"score": 0.5, "no_steering_score": 0.1, "n_prompts": 10},
        },
    )
    german = extract_instruction(tiny_lm, get_instruction(GERMAN), [2], n_pairs=4)
    donor = Point((2,), "projection", 2.0)
    write_calibrated(
        folder / file_name(GERMAN),
        steerings_for(donor, german),
        {
            "status": "searched",
            "recommended": True,
            "point": donor.key,
            "mode": "projection",
            "scale": 2.0,
            "validation": {"score": 0.3, "no_steering_score": 0.0, "n_prompts": 10},
            "paper_targets": {"2": german[2].target},
        },
    )
    return folder


@pytest.fixture(scope="module")
def run_server() -> Iterator[Any]:
    """Real uvicorn servers on loopback ports, stopped at the end of the module."""
    servers = []

    def start(app: Any) -> Running:
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        servers.append((server, thread))
        return Running(f"http://127.0.0.1:{port}", app)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IFSTEER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_lm) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llama"  # the id the vectors carry
    tiny_lm.model.save_pretrained(path)
    tiny_lm.tokenizer.save_pretrained(path)
    return path


def expected(lm, steerings: list[Steering]) -> str:
    return generate(lm, [PROMPT], steering=steerings, sampling=Sampling(max_new_tokens=TOKENS))[
        0
    ].text


def cli(monkeypatch, capsys, shipped: Path, *args: str) -> tuple[int, str, str]:
    import ifsteer.shipped.points

    monkeypatch.setattr(ifsteer.shipped.points, "shipped_dir", lambda model_id="": shipped)
    monkeypatch.setattr(sys, "argv", ["ifsteer", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def chat(instruction_id: str, **entry: Any) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": TOKENS,
        "steering": [{"instruction_id": instruction_id, **entry}],
    }


@dataclass
class Recording:
    """A `Backend` that keeps each job: the server hands vLLM exactly these steerings."""

    lm: Any
    jobs: list[Job] = field(default_factory=list)
    model_id: str = "tiny-llama"
    context_length: int | None = None

    def __post_init__(self) -> None:
        self.tokenizer = self.lm.tokenizer
        self.n_layers, self.hidden_size = self.lm.n_layers, self.lm.hidden_size

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, job: Job) -> Completion:
        self.jobs.append(job)
        return Completion("ok", 1, 1, "stop")

    async def extract(self, instruction: Any, layer: int) -> Any:
        return extract_instruction(self.lm, instruction, [layer], n_pairs=4)[layer]

    def stats(self) -> dict[str, Any]:
        return {}


def test_every_face_applies_a_multi_layer_generated_only_point_alike(
    monkeypatch, capsys, tiny_lm, shipped, model_dir, run_server, home
):
    point = read_calibrated(shipped / file_name(TITLE))
    want = point.steerings()
    assert point.method == "trained" and point.layers == (1, 3)
    assert signature(want)[0][1:4] == ("additive", 3.0, "generated")
    assert expected(tiny_lm, want) != expected(tiny_lm, [])  # the point changes the answer

    # generate -i
    code, out, err = cli(
        monkeypatch, capsys, shipped, "generate", "-m", str(model_dir), "-i", TITLE,
        "-p", PROMPT, "--max-new-tokens", str(TOKENS), "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["steered"] == expected(tiny_lm, want)
    assert "L1+3:additive:trained:generated at layers [1, 3] (searched, recommended)" in err

    # eval --shipped and eval --vectors
    row = Row(1, "Write a poem. Give it a title.", "Write a poem.", (TITLE,), ({},))
    for source in (recommended_files(directory=shipped), shipped):
        plan = plan_vectors(
            tiny_lm, [row], source, weights={}, modes={}, layers={}, allow_transfer=False
        )
        assert signature(plan.steerings["1"]) == signature(want)
        assert [r["positions"] for r in plan.records["1"]] == ["generated", "generated"]

    # the HF server
    points = Points("tiny-llama", directory=shipped)
    hf = run_server(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4, points=points))
    answer = httpx.post(f"{hf.v1}/chat/completions", json=chat(TITLE), timeout=120).json()
    assert answer["choices"][0]["message"]["content"] == expected(tiny_lm, want)
    [echo] = answer["steering"]
    assert echo["point"] == "shipped" and echo["layers"] == [1, 3] and echo["recommended"]
    assert echo["weights"] == [3.0, 5.0] and echo["positions"] == "generated"
    assert echo["method"] == "trained" and echo["status"] == "searched"

    # the same file served by name (--vectors DIR): its point, unless a layer is asked for
    named = run_server(create_app(tiny_lm, load_vector_dir(shipped), limits=LIMITS))
    body = {**chat(TITLE), "steering": [{"vector": "detectable_format__title"}]}
    answer = httpx.post(f"{named.v1}/chat/completions", json=body, timeout=120).json()
    assert answer["choices"][0]["message"]["content"] == expected(tiny_lm, want)
    assert answer["steering"][0]["point"] == "file" and answer["steering"][0]["layers"] == [1, 3]

    # the vLLM backend: the same resolver, so the same steerings on the wire to its workers
    engine = Recording(tiny_lm)
    vllm = run_server(build_app(engine, {}, limits=LIMITS, points=points))
    response = httpx.post(f"{vllm.v1}/chat/completions", json=chat(TITLE), timeout=120)
    assert response.status_code == 200, response.text
    [job] = engine.jobs
    assert signature(list(job.steering)) == signature(want)
    assert steering_args(job.steering) == steering_args(want)


def test_a_layer_in_the_request_extracts_there_and_says_so(tiny_lm, shipped, run_server, home):
    points = Points("tiny-llama", directory=shipped)
    srv = run_server(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4, points=points))
    answer = httpx.post(f"{srv.v1}/chat/completions", json=chat(TITLE, layer=2), timeout=120)
    [echo] = answer.json()["steering"]
    assert echo["point"] == "extracted" and echo["status"] == "uncalibrated"
    assert echo["layer"] == 2 and "layers" not in echo
    vector = extract_instruction(tiny_lm, get_instruction(TITLE), [2], n_pairs=4)[2]
    assert answer.json()["choices"][0]["message"]["content"] == expected(
        tiny_lm, [Steering(vector)]
    )
    # overrides apply to every layer of a point; positions default to the point's own
    answer = httpx.post(
        f"{srv.v1}/chat/completions", json=chat(TITLE, weight=-2.0), timeout=120
    ).json()
    [echo] = answer["steering"]
    assert echo["weights"] == [-2.0, -2.0] and echo["positions"] == "generated"


def test_vectors_lists_the_shipped_points_with_their_scores(tiny_lm, shipped, run_server, home):
    points = Points("tiny-llama", directory=shipped)
    srv = run_server(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4, points=points))
    rows = {r["id"]: r for r in httpx.get(f"{srv.v1}/vectors").json()["data"]}
    title = rows[f"instruction_id:{TITLE}"]
    assert title["source"] == "shipped" and title["layers"] == [1, 3]
    assert title["score"] == 0.5 and title["no_steering_score"] == 0.1
    assert title["recommended"] and title["method"] == "trained"
    assert rows[f"instruction_id:{GERMAN}"]["method"] == "mean_difference"
    assert f"instruction_id:{FRENCH}" not in rows  # not made yet


def test_an_id_without_a_file_gets_its_groups_point_once_cached_and_unverified(
    monkeypatch, capsys, tiny_lm, shipped, model_dir, run_server, home
):
    points = Points("tiny-llama", directory=shipped)
    group = points.lookup(FRENCH)
    assert isinstance(group, GroupPoint) and group.donor.instruction_id == GERMAN
    french = extract_instruction(tiny_lm, instruction_for(FRENCH), [2], n_pairs=4)
    want = group.steerings(french)
    assert signature(want)[0][:4] == (2, "projection", 1.0, "all")

    srv = run_server(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4, points=points))
    first = httpx.post(f"{srv.v1}/chat/completions", json=chat(FRENCH), timeout=120).json()
    again = httpx.post(f"{srv.v1}/chat/completions", json=chat(FRENCH), timeout=120).json()
    assert httpx.get(f"{srv.url}/health").json()["engine"]["extractions"] == 1
    assert first["choices"][0]["message"]["content"] == expected(tiny_lm, want)
    assert again["choices"][0]["message"]["content"] == expected(tiny_lm, want)
    [echo] = first["steering"]
    assert echo["point"] == "group" and echo["status"] == "unverified"
    assert echo["group_of"] == GERMAN and echo["layers"] == [2] and not echo["recommended"]

    cached = home / "points" / "tiny-llama" / file_name(FRENCH)
    assert cached.is_file() and read_calibrated(cached).status == "unverified"
    rows = {r["id"]: r for r in httpx.get(f"{srv.v1}/vectors").json()["data"]}
    assert rows[f"instruction_id:{FRENCH}"]["status"] == "unverified"

    # the CLI finds the server's point in the cache: no extraction, the same steerings
    code, out, err = cli(
        monkeypatch, capsys, shipped, "generate", "-m", str(model_dir), "-i", FRENCH,
        "-p", PROMPT, "--max-new-tokens", str(TOKENS), "--json",
    )  # fmt: skip
    assert code == 0, err
    assert "extracting" not in err and "unverified" in err and GERMAN in err
    assert json.loads(out)["steered"] == expected(tiny_lm, want)
    code, out, err = cli(monkeypatch, capsys, shipped, "vectors", "list", "-m", str(model_dir))
    assert code == 0 and FRENCH in out and "unverified" in out, err
    code, out, _ = cli(
        monkeypatch, capsys, shipped, "vectors", "list", "-m", str(model_dir), "--json"
    )
    rows = {row["instruction_id"]: row for row in json.loads(out)}
    assert rows[FRENCH]["group_of"] == GERMAN and rows[TITLE]["status"] == "searched"


def test_the_cli_extracts_a_group_point_once(monkeypatch, capsys, shipped, model_dir, home):
    args = ("generate", "-m", str(model_dir), "-i", "keywords:existence:zebra", "-p", PROMPT)
    # no keyword file ships here: no group point, the one-line refusal
    code, _, err = cli(monkeypatch, capsys, shipped, *args, "--max-new-tokens", "2")
    assert code == 2 and "nor for its group" in err and "Traceback" not in err
    code, _, err = cli(monkeypatch, capsys, shipped, "generate", "-m", str(model_dir),
                       "-i", "language:response_language:ja", "-p", PROMPT,
                       "--max-new-tokens", "2")  # fmt: skip
    assert code == 0 and "extracting it once" in err and "unverified" in err
    code, _, err = cli(monkeypatch, capsys, shipped, "generate", "-m", str(model_dir),
                       "-i", "language:response_language:ja", "-p", PROMPT,
                       "--max-new-tokens", "2")  # fmt: skip
    assert code == 0 and "extracting" not in err and "unverified" in err


def test_a_group_point_keeps_the_donors_scale_per_layer(tiny_lm, shipped, home):
    group = Points("tiny-llama", directory=shipped).lookup(FRENCH)
    assert isinstance(group, GroupPoint)
    french = extract_instruction(tiny_lm, instruction_for(FRENCH), [2], n_pairs=4)
    [steering] = group.steerings(french)
    v = french[2]
    assert steering.vector.target == pytest.approx(v.target + v.norm)  # scale 2: c̄ + ‖u‖
    # an additive donor: the same weight in units of ‖u‖
    additive = read_calibrated(shipped / file_name(TITLE))
    donor = GroupPoint(instruction_for(FRENCH), additive, Path("unused"))
    vectors = extract_instruction(tiny_lm, instruction_for(FRENCH), [1, 3], n_pairs=4)
    weights = [s.effective_weight for s in donor.steerings(vectors)]
    assert weights == pytest.approx(
        [
            w / d.norm * vectors[d.layer].norm
            for d, w in zip(additive.vectors, (3.0, 5.0), strict=True)
        ]
    )


def test_an_instruction_is_bounded_by_tokens_not_characters(tiny_lm, run_server, home):
    srv = run_server(create_app(tiny_lm, {}, limits=LIMITS, extract_pairs=4))
    emoji = "\U0001f600" * 1000  # 1,000 characters, four bytes (tokens here) each
    body = {**chat(TITLE), "steering": [{"instruction": emoji}]}
    response = httpx.post(f"{srv.v1}/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "steering.0.instruction"
    assert "tokens, the limit is 256" in error["message"]
    assert httpx.get(f"{srv.url}/health").json()["engine"]["extractions"] == 0
    body["steering"] = [{"instruction": "Answer in one short sentence."}]
    assert httpx.post(f"{srv.v1}/chat/completions", json=body, timeout=120).status_code == 200


def test_a_cached_group_point_is_made_again_when_its_donor_changes(tiny_lm, shipped, home):
    polish = "language:response_language:pl"
    points = Points("tiny-llama", directory=shipped)
    group = points.lookup(polish)
    assert isinstance(group, GroupPoint)
    group.save(extract_instruction(tiny_lm, instruction_for(polish), [2], n_pairs=4))
    cached = Points("tiny-llama", directory=shipped).lookup(polish)
    assert isinstance(cached, ShippedVector) and cached.status == "unverified"
    # German rebuilt at another point: the cached Polish point is stale
    rebuilt = home / "rebuilt"
    german = extract_instruction(tiny_lm, get_instruction(GERMAN), [1], n_pairs=4)
    point = Point((1,), "additive", 1.0)
    write_calibrated(
        rebuilt / file_name(GERMAN),
        steerings_for(point, german),
        {"status": "searched", "recommended": True, "point": point.key, "validation": None},
    )
    again = Points("tiny-llama", directory=rebuilt).lookup(polish)
    assert isinstance(again, GroupPoint) and again.layers == (1,)
    # a trained file lends no point: its weights mean nothing for another id's vector
    trained = home / "trained"
    write_calibrated(
        trained / file_name(GERMAN),
        steerings_for(point, german),
        {"status": "searched", "method": "trained", "recommended": True, "point": point.key},
    )
    assert Points("tiny-llama", directory=trained).lookup(polish) is None
    # an id is looked up as the catalogue spells it: a keyword's word in lowercase
    zebra = "keywords:existence:zebra"
    words = home / "words"
    vectors = extract_instruction(tiny_lm, get_instruction(zebra), [1], n_pairs=4)
    write_calibrated(
        words / file_name(zebra),
        steerings_for(point, vectors),
        {"status": "searched", "recommended": True, "point": point.key},
    )
    found = Points("tiny-llama", directory=words).lookup("keywords:existence:Zebra")
    assert isinstance(found, ShippedVector) and found.path == words / file_name(zebra)
