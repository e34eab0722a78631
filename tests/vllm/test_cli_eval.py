"""`ifsteer eval --backend vllm` as users run it (`python -m ifsteer.cli`, a subprocess, one vLLM
engine, `--enforce-eager`: the user's way back to an uncompiled model, and the tier's one eager
engine): the run directory holds the files `--backend hf` writes, with the same unsteered
answers and verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ifsteer.evaluation.store import read_responses
from ifsteer.models import DEFAULT_MODEL, load_model
from ifsteer.rundir import RESPONSES, SUMMARY

from .conftest import vllm_model_dir, write_capital_case

pytestmark = pytest.mark.vllm
SETTINGS = "no_instruction,steer"


def _eval(root: Path, out: Path, *backend: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ifsteer.cli",
            "eval",
            "--data",
            str(root / "rows.jsonl"),
            "--vectors",
            str(root / "vectors"),
            "--out",
            str(out),
            "--limit",
            "3",
            "--settings",
            SETTINGS,
            "--max-new-tokens",
            "12",
            "--no-perplexity",
            *backend,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def test_eval_with_backend_vllm_writes_the_hf_backends_run_directory(tmp_path):
    vllm_model_dir()  # the converted cache vLLM loads exists, in the standard layout
    write_capital_case(tmp_path, load_model(DEFAULT_MODEL, "float32"))
    ours = _eval(
        tmp_path,
        tmp_path / "vllm",
        "--backend",
        "vllm",
        "--kv-cache-gib",
        "0.25",
        "--max-model-len",
        "1024",
        "--enforce-eager",
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "6 new responses" in ours.stdout
    hf = _eval(tmp_path, tmp_path / "hf")
    assert hf.returncode == 0, hf.stderr[-3000:]
    files = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("hf", "vllm")]
    assert files[0] == files[1] and {RESPONSES, SUMMARY} <= set(files[0])
    theirs, mine = (
        {(r["setting"], str(r["key"])): r for r in read_responses(tmp_path / d / RESPONSES)}
        for d in ("hf", "vllm")
    )
    assert mine.keys() == theirs.keys() and len(mine) == 6
    for key, record in mine.items():
        if key[0] == "no_instruction":
            other = theirs[key]
            assert (record["response"], record["strict"]) == (other["response"], other["strict"])
    summaries = [json.loads((tmp_path / d / SUMMARY).read_text()) for d in ("hf", "vllm")]
    assert summaries[0].keys() == summaries[1].keys()
