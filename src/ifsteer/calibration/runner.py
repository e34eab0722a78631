"""The runner both calibration plans share: a list of jobs in, one answer each out.

The paper's sweep (`sweep`) and the staged search (`search`) differ in which points they try
and how they score an answer, not in how answers are made: every job of a plan goes into one
continuous-batching job queue (`Batcher`, or vLLM's through `engine`), each row steered by its
own steerings and, with a decider, stopped as soon as its check has failed for good. With an
answer log and a key per job, an answer already on disk is reused and each new one is written
the moment it finishes, so a killed run loses none it reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from ifsteer.batcher import Batcher
from ifsteer.calibration.answers import AnswerLog
from ifsteer.jobs import Completion, Job, QueueFactory
from ifsteer.models import LoadedModel

__all__ = ["answer_jobs"]

Progress = Callable[[int], None]


def answer_jobs(
    lm: LoadedModel,
    jobs: Sequence[Job],
    *,
    engine: QueueFactory = Batcher,
    batch_size: int | None = None,
    log: AnswerLog | None = None,
    keys: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[Completion]:
    """Each job's completion, in order: from `log` under `keys[i]` where it is there, else
    made, submitted in the order given (a plan sorts its jobs as it likes them batched).

    Progress counts the reused answers first, then each new one as it finishes.
    """
    if log is not None and (keys is None or len(keys) != len(jobs)):
        raise ValueError("an answer log needs one key per job")
    if not jobs:
        return []
    longest = max(len(job.ids) for job in jobs)
    new_tokens = max(job.sampling.max_new_tokens for job in jobs)
    queue = engine(lm, batch_size=batch_size, max_tokens=longest + new_tokens, allow_transfer=False)
    slots: list[int | Completion] = []  # a job id, or an answer from the log
    for i, job in enumerate(jobs):
        known = None if log is None or keys is None else log.get(keys[i])
        if known is not None:
            slots.append(known)
        elif log is None or keys is None:
            slots.append(queue.submit(job))
        else:
            slots.append(queue.submit(replace(job, on_done=log.recorder(keys[i]))))
    reused = sum(isinstance(slot, Completion) for slot in slots)
    if progress is not None and reused:
        progress(reused)
    done = queue.run(progress)
    return [slot if isinstance(slot, Completion) else done[slot] for slot in slots]
