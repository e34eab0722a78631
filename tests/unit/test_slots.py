"""The batcher's slot cache: written in place, slots reused, the window kept exact."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ifsteer.batcher import Batcher
from ifsteer.jobs import Job, Sampling
from ifsteer.slots import ROOM, SlotCache


def prefill(rows: int, width: int, seed: int, layers: int = 2) -> DynamicCache:
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(layers):
        keys = torch.randn(rows, 2, width, 4, generator=generator)
        cache.update(keys, keys + 1.0, layer)
    return cache


def test_a_decode_step_writes_in_place_and_the_window_grows():
    cache = SlotCache(prefill(3, 5, seed=0))
    buffer = cache.layers[0].key_buffer
    column = torch.randn(3, 2, 1, 4)
    keys, _ = cache.update(column, column, 0)
    assert cache.layers[0].key_buffer is buffer and keys.shape[-2] == 6
    torch.testing.assert_close(keys[:, :, -1:], column)


def test_the_buffer_is_moved_back_when_the_window_reaches_its_end():
    cache = SlotCache(prefill(1, 2, seed=0, layers=1))
    first = cache.layers[0].key_buffer
    for step in range(ROOM + 1):
        cache.update(torch.full((1, 2, 1, 4), float(step)), torch.zeros(1, 2, 1, 4), 0)
    keys = cache.layers[0].keys
    assert cache.layers[0].key_buffer is not first and keys.shape[-2] == 2 + ROOM + 1
    assert keys[0, 0, 2:, 0].tolist() == [float(s) for s in range(ROOM + 1)]


def test_a_wider_prompt_widens_the_window_and_keeps_every_row():
    cache = SlotCache(prefill(2, 3, seed=0))
    before = cache.layers[1].keys.clone()
    joining = prefill(1, 5, seed=1)
    cache.write([2], joining)  # a new slot, two columns wider than the window
    keys = cache.layers[1].keys
    assert keys.shape == (3, 2, 5, 4)
    torch.testing.assert_close(keys[:2, :, 2:], before)
    assert keys[:2, :, :2].abs().sum() == 0  # the widened columns are finite padding
    torch.testing.assert_close(keys[2:], joining.layers[1].keys)


def test_a_narrower_prompt_is_right_aligned_in_a_free_slot():
    cache = SlotCache(prefill(2, 6, seed=0))
    kept = cache.layers[0].keys[0].clone()
    joining = prefill(1, 4, seed=2)
    cache.write([1], joining)
    keys = cache.layers[0].keys
    assert keys.shape == (2, 2, 6, 4)
    torch.testing.assert_close(keys[0], kept)
    torch.testing.assert_close(keys[1, :, 2:], joining.layers[0].keys[0])


def test_trim_and_compact_keep_the_window_exact():
    cache = SlotCache(prefill(5, 6, seed=0))
    keys = cache.layers[0].keys.clone()
    buffer = cache.layers[0].key_buffer
    cache.trim(2)
    order = cache.compact([0, 3, 4])  # slots 1 and 2 are free: the rows of 3 and 4 move in
    assert order == [0, 3, 4] and cache.slots == 3 and cache.width == 4
    torch.testing.assert_close(cache.layers[0].keys, keys[order, :, 2:])
    assert cache.layers[0].key_buffer.data_ptr() == buffer.data_ptr()  # cut, not copied
    assert cache.compact([1, 2]) == [2, 1]  # slot 0 freed: the last row fills it
    torch.testing.assert_close(cache.layers[0].keys, keys[[4, 3], :, 2:])


def jobs(lm, *lengths: int) -> list[Job]:
    return [
        Job(
            lm.render(f"Plan {i + 2} picnics.").ids,
            sampling=Sampling(max_new_tokens=n, ignore_eos=True),
        )
        for i, n in enumerate(lengths)
    ]


def test_a_joining_job_takes_the_slot_an_ended_row_left(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=2)
    for job in jobs(tiny_lm, 2, 9, 9):
        batcher.submit(job)
    slots = []
    while batcher.busy:
        batcher.step()
        slots.append(len(batcher._slots))
    assert max(slots) == 2  # three rows, never more than two slots


def test_free_slots_are_given_up_when_nothing_waits(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=3)
    for job in jobs(tiny_lm, 2, 8, 8):
        batcher.submit(job)
    for _ in range(3):
        batcher.step()
    assert len(batcher._slots) == len(batcher._active) == 2


def test_no_free_slot_decodes_once_nothing_waits(tiny_lm):
    batcher = Batcher(tiny_lm, batch_size=8)
    for job in jobs(tiny_lm, 2, 3, *[9] * 6):
        batcher.submit(job)
    sizes = []
    while batcher.busy:
        batcher.step()
        sizes.append((len(batcher._slots), batcher._slots.count(None)))
    assert sizes[:3] == [(7, 0), (6, 0), (6, 0)]
