from __future__ import annotations

from ifsteer.batching import CPU_ROWS, auto_batch_size, free_memory, row_bytes


def test_a_small_model_on_cpu_gets_the_cpu_cap(tiny_lm):
    assert auto_batch_size(tiny_lm, free_bytes=10**12) == CPU_ROWS


def test_memory_limits_the_batch(tiny_lm):
    per_row = row_bytes(tiny_lm, 512)
    # tiny llama: 4 layers x 2 kv heads x 16 dims x 4 bytes x (k, v) x 512 columns + logits
    assert per_row == 2 * 4 * 2 * 16 * 4 * 512 + 320 * 4
    assert auto_batch_size(tiny_lm, free_bytes=per_row * 10) == 5  # half the memory for rows
    assert auto_batch_size(tiny_lm, free_bytes=0) == 1
    assert row_bytes(tiny_lm, 1024) > per_row


def test_free_memory_is_read(tiny_lm):
    assert free_memory(tiny_lm.device) > 0
