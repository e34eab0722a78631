"""The continuous batcher: one queue of jobs, each row with its own steering.

A static batch keeps finished rows until its longest row ends, and a batch of 8 leaves most of
a CPU idle. Here a row leaves the batch as soon as it stops (end of turn, `max_new_tokens`, or
its `decided` predicate) and a waiting job takes its place, so the batch stays full.

How the KV cache stays exact while rows come and go: every row lives left-padded in a slot of
one cache of width W (`slots.SlotCache`); row i masks its first `pad[i]` columns, so its next
token sits at position W − pad[i], the position it has when generated alone. A joining group is
prefilled on its own (steering sees it in the prompt phase, as `steer` tracks by the empty
cache), then written right-aligned into the slots that finished rows left free (the window is
widened on the left first if the prompts are wider). A free slot waits for the next joiner,
decoding a masked pad token meanwhile; once no job waits, free slots are given up. Columns that
are padding for every row are cut off. No layer keeps a sliding window of its own: sliding
windows are applied by the model's mask over cache columns, which stay contiguous per row, so
Gemma 2/3 need nothing special. Jobs that must give the same tokens share a row (`sharing`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ifsteer.batching import auto_batch_size
from ifsteer.errors import InvalidSteering
from ifsteer.jobs import Completion, Job, check_job, drain
from ifsteer.models import LoadedModel
from ifsteer.sampling import Sampling, draw, generator_for
from ifsteer.sharing import Ticket, job_key, prompt_key
from ifsteer.slots import SlotCache
from ifsteer.steering import Steering, steer
from ifsteer.transformers_compat import cache_argument, select_rows

# How far ahead of the queue's head a joining group may look for rows of a similar length.
_BUCKET_WINDOW = 4
# Cost is bounded by tokens, not rows: a step prefills at most PREFILL_TOKENS (rows × padded
# width; the queue's head always joins), in forwards of PREFILL_CHUNK columns, since a prompt's
# attention scores grow with the square of what one forward reads (8 rows of 2,000 tokens in
# one forward took 1.3 GB).
PREFILL_TOKENS = 8192
PREFILL_CHUNK = 512


@dataclass(eq=False)
class _Row:
    key: Hashable | None  # None: never shared (unseeded sampling)
    prompt_key: Hashable  # rows with equal prompt keys have equal prompt KV and first logits
    ids: list[int]
    steering: Sequence[Steering]
    sampling: Sampling
    generator: torch.Generator | None
    tickets: list[Ticket]
    settled: list[tuple[Ticket, Completion]] = field(default_factory=list)  # decided tickets
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    pad: int = 0
    finish: str | None = None
    logprob: float | None = None  # summed over `tokens`; None: not recorded

    @property
    def wants_text(self) -> bool:
        return any(t.job.on_text or t.job.decided for t in self.tickets)


class Batcher:
    """Decode submitted jobs together (a `jobs.JobQueue`); `run()` drains the queue, `step()`
    advances one token.

    A server calls `submit` from request threads and `step` in one worker loop while `busy`;
    jobs report through their own `on_text` / `on_done`. Greedy rows give token for token what
    they give alone; sampled rows draw from their own generator (their seed, or a fresh one).
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        batch_size: int | None = None,
        max_tokens: int = 512,
        allow_transfer: bool = False,
        prefill_tokens: int = PREFILL_TOKENS,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise InvalidSteering("batch_size must be at least 1")
        if prefill_tokens < 1 or prefill_chunk < 1:
            raise InvalidSteering("prefill_tokens and prefill_chunk must be at least 1")
        self.prefill_tokens = prefill_tokens
        self.prefill_chunk = prefill_chunk
        self.lm = lm
        self._cache_arg = cache_argument(lm.model)
        self.batch_size = batch_size or auto_batch_size(lm, max_tokens=max_tokens)
        self.allow_transfer = allow_transfer
        self._stop = frozenset(lm.stop_token_ids())
        self._waiting: list[_Row] = []
        self._slots: list[_Row | None] = []  # the cache's rows: a decoding row, or free
        self._shared: dict[Hashable, _Row] = {}
        self._cache: SlotCache | None = None
        self._next_id = 0
        self._lock = threading.RLock()  # callbacks may submit

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def _active(self) -> list[_Row]:
        return [row for row in self._slots if row is not None]

    @property
    def rows(self) -> int:
        """Rows decoding now (shared jobs count once)."""
        return len(self._active)

    def submit(self, job: Job) -> int:
        """Queue a job and return its id; bad steering or sampling is refused here, at once."""
        check_job(self.lm, job, allow_transfer=self.allow_transfer)
        key = job_key(job)
        with self._lock:
            ticket = Ticket(self._next_id, job)
            self._next_id += 1
            row = self._shared.get(key) if key is not None else None
            if row is not None and job.decided is not None and (row.tokens or row.finish):
                # A decider is checked from the first token on: a row already decoding may have
                # passed the point where this job alone would have stopped.
                row = None
            if row is not None:
                row.tickets.append(ticket)
                ticket.emit(row.text)
                return ticket.job_id
            row = _Row(
                key=key,
                prompt_key=prompt_key(job),
                ids=list(job.ids),
                steering=tuple(job.steering),
                sampling=job.sampling,
                generator=generator_for(job.sampling, self.lm.device),
                tickets=[ticket],
                logprob=0.0 if job.logprobs else None,
            )
            if key is not None:
                self._shared[key] = row
            self._waiting.append(row)
        return ticket.job_id

    def cancel(self, job_id: int) -> bool:
        """Drop a job (a client went away); its row stops once no other job shares it."""
        with self._lock:
            for row in (*self._waiting, *self._active):
                tickets = [t for t in row.tickets if t.job_id != job_id]
                if len(tickets) == len(row.tickets):
                    continue
                row.tickets = tickets
                if not tickets:
                    self._unshare(row)
                    if row in self._waiting:
                        self._waiting.remove(row)
                    else:
                        row.finish = "cancelled"
                return True
        return False

    def run(self, progress: Callable[[int], None] | None = None) -> dict[int, Completion]:
        """Decode until the queue is empty; completions by job id."""
        return drain(self, progress)

    @torch.no_grad()
    def step(self) -> list[tuple[int, Completion]]:
        """Let waiting jobs join, decode one token for every row, retire the rows that ended."""
        finished = []
        joining = self._pick_joining()
        if joining:
            self._prefill(joining)
            finished += self._retire()
        if self._active:
            self._decode()
            finished += self._retire()
        return finished

    def _pick_joining(self) -> list[_Row]:
        """The queue's head, then the waiting rows nearest its length (less padding), while
        the group's padded tokens stay within `prefill_tokens`."""
        with self._lock:
            free = self.batch_size - len(self._active)
            if free <= 0 or not self._waiting:
                return []
            head, rest = self._waiting[0], self._waiting[1 : free * _BUCKET_WINDOW]
            rest = sorted(rest, key=lambda r: abs(len(r.ids) - len(head.ids)))[: free - 1]
            group, width = [head], len(head.ids)
            for row in rest:
                wider = max(width, len(row.ids))
                if (len(group) + 1) * wider <= self.prefill_tokens:
                    group.append(row)
                    width = wider
            chosen = {id(r) for r in group}
            self._waiting = [r for r in self._waiting if id(r) not in chosen]
            return group

    def _prefill(self, rows: list[_Row]) -> None:
        # Rows whose prompt is read alike (same tokens, same prompt-phase steering) share one
        # prefill: their KV and first logits are equal, so one copy is computed and repeated.
        unique: dict[Hashable, int] = {}
        leaders: list[_Row] = []
        for row in rows:
            if row.prompt_key not in unique:
                unique[row.prompt_key] = len(leaders)
                leaders.append(row)
        width = max(len(r.ids) for r in leaders)
        pad_id = self.lm.tokenizer.pad_token_id or 0
        device = self.lm.device
        ids = torch.tensor(
            [[pad_id] * (width - len(r.ids)) + r.ids for r in leaders], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in leaders], device=device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with steer(self.lm, per_row=[r.steering for r in leaders], allow_transfer=True) as h:
            # Later chunks extend a filled cache, which `steer` reads as generating: they are
            # still the prompt (a hook after steer's own says so).
            pin = self.lm.model.register_forward_pre_hook(lambda *_: setattr(h, "phase", "prompt"))
            try:
                for start in range(0, width, self.prefill_chunk):
                    end = min(width, start + self.prefill_chunk)
                    out = self.lm.model(
                        input_ids=ids[:, start:end],
                        attention_mask=mask[:, :end],
                        position_ids=positions[:, start:end],
                        **{self._cache_arg: cache},
                        use_cache=True,
                        logits_to_keep=1,
                    )
            finally:
                pin.remove()
        spread = torch.tensor([unique[r.prompt_key] for r in rows], device=device)
        select_rows(cache, spread)
        for row in rows:
            row.pad = width - len(row.ids)
        self._join(cache, width, rows)
        self._advance(rows, out.logits[:, -1].index_select(0, spread))

    def _join(self, cache: DynamicCache, width: int, rows: list[_Row]) -> None:
        """Write a prefilled group into free slots (new ones where none is free)."""
        with self._lock:
            if self._cache is None:
                self._cache, self._slots = SlotCache(cache), list(rows)
                return
            before = self._cache.width
            free = [i for i, row in enumerate(self._slots) if row is None][: len(rows)]
            added = len(rows) - len(free)
            targets = free + list(range(len(self._slots), len(self._slots) + added))
            self._cache.write(targets, cache)
            self._slots += [None] * added
            grown = self._cache.width - before
            for row in self._active:
                row.pad += grown
            for slot, row in zip(targets, rows, strict=True):
                row.pad += self._cache.width - width
                self._slots[slot] = row
            self._release_free()

    def _decode(self) -> None:
        if self._cache is None:
            return
        slots = self._slots
        device = self.lm.device
        width = self._cache.width
        # A free slot decodes a pad token that sees only itself: no NaN reaches its columns.
        pads = torch.tensor([width if r is None else r.pad for r in slots], device=device)
        pad_id = self.lm.tokenizer.pad_token_id or 0
        tokens = [[pad_id] if r is None else [r.tokens[-1]] for r in slots]
        mask = (torch.arange(width + 1, device=device)[None, :] >= pads[:, None]).long()
        per_row = [() if r is None else r.steering for r in slots]
        with steer(self.lm, per_row=per_row, allow_transfer=True):
            out = self.lm.model(
                input_ids=torch.tensor(tokens, device=device),
                attention_mask=mask,
                position_ids=(width - pads)[:, None],
                **{self._cache_arg: self._cache},
                use_cache=True,
            )
        logits = out.logits[:, -1]
        rows = [r for r in slots if r is not None]
        if len(rows) < len(slots):
            live = [i for i, r in enumerate(slots) if r is not None]
            logits = logits.index_select(0, torch.tensor(live, device=device))
        self._advance(rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Append each row's next token and decide whether the row has ended."""
        greedy = logits.argmax(-1).tolist()
        tokens = [
            greedy[i] if row.generator is None else draw(logits[i], row.sampling, row.generator)
            for i, row in enumerate(rows)
        ]
        scored = _logprobs(rows, logits, tokens)
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if token in self._stop and not row.sampling.ignore_eos:
                row.finish = "stop"
                continue
            row.tokens.append(token)
            if row.logprob is not None:
                row.logprob += scored[i]
            if row.wants_text:
                text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # half a multi-byte character: wait for more
                    row.text = text
                    with self._lock:
                        for ticket in row.tickets:
                            ticket.emit(text)
                    self._settle(row, text)
            if row.finish is None and len(row.tokens) >= row.sampling.max_new_tokens:
                row.finish = "length"

    def _settle(self, row: _Row, text: str) -> None:
        """Tickets whose decider fires on `text` leave the row with the answer so far; a row
        that no ticket needs any more stops."""
        with self._lock:
            for ticket in [t for t in row.tickets if t.job.decided and t.job.decided(text)]:
                row.tickets.remove(ticket)
                completion = Completion(text, len(row.ids), len(row.tokens), "decided", row.logprob)
                row.settled.append((ticket, completion))
            if row.settled and not row.tickets:
                row.finish = "decided"
                self._unshare(row)

    def _unshare(self, row: _Row) -> None:
        if row.key is not None and self._shared.get(row.key) is row:
            del self._shared[row.key]

    def _retire(self) -> list[tuple[int, Completion]]:
        with self._lock:
            finished = [settled for row in self._active for settled in row.settled]
            for row in self._active:
                row.settled = []
            ended = [r for r in self._active if r.finish is not None]
            if ended:
                self._drop_ended()
            for row in ended:
                self._unshare(row)
                row.text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True)
                completion = Completion(
                    row.text, len(row.ids), len(row.tokens), row.finish or "", row.logprob
                )
                for ticket in row.tickets:
                    ticket.emit(row.text)
                    finished.append((ticket, completion))
        for ticket, completion in finished:
            if ticket.job.on_done is not None:
                ticket.job.on_done(completion)
        return [(ticket.job_id, completion) for ticket, completion in finished]

    def _drop_ended(self) -> None:
        """Free the slots of ended rows; cut columns that are only padding."""
        self._slots = [r if r is not None and r.finish is None else None for r in self._slots]
        active = self._active
        if not active or self._cache is None:
            self._cache, self._slots = None, []
            return
        self._release_free()
        unused = min(r.pad for r in active)
        if unused:
            self._cache.trim(unused)
            for row in active:
                row.pad -= unused

    def _release_free(self) -> None:
        """Give up free slots once no job waits to take them: each would decode for nothing at
        every step, while giving it up copies one row (`SlotCache.compact`)."""
        if self._waiting or self._cache is None or None not in self._slots:
            return
        live = [i for i, r in enumerate(self._slots) if r is not None]
        self._slots = [self._slots[i] for i in self._cache.compact(live)]


def _logprobs(
    rows: Sequence[_Row], logits: torch.Tensor, tokens: Sequence[int]
) -> dict[int, float]:
    """Each recording row's chosen token's log-probability, by its index in `rows`."""
    wanted = [i for i, row in enumerate(rows) if row.logprob is not None]
    if not wanted:
        return {}
    index = torch.tensor(wanted, device=logits.device)
    picked = logits.index_select(0, index).float()
    chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
    values = picked.gather(1, chosen[:, None])[:, 0] - picked.logsumexp(-1)
    return dict(zip(wanted, values.tolist(), strict=True))
