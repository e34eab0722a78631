"""A KV cache of row slots written in place, for continuous batching.

transformers' `DynamicCache` appends each decode step's keys and values with `torch.cat`, which
copies the whole cache of every layer at every step (on SmolLM2-135M, batch 64 at 300 columns,
that copy was two thirds of a step once attention stopped copying it too); and stacking or
dropping rows as they join and leave copies it again. Here each layer keeps one buffer of
`[slots, kv_heads, capacity, head_dim]` and a window `[start, end)` of it that is the cache:
a step writes one column in place; a finished row's slot is refilled by the next joining row;
columns that are padding for every row leave by moving `start`; free slots are given up by
moving the rows of the last slots into them and cutting the buffer after the rows kept (a view).
The whole buffer is copied only when the window reaches its end (it is moved back, with room to
grow), when a joining prompt is wider than the room left of the window, and when slots are
added.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

# Free columns given to a buffer beyond the window when it is (re)made; at one column a step,
# the buffer is copied once per this many steps at most.
ROOM = 128


class SlotLayer(DynamicLayer):
    """One layer's slots; `keys` / `values` are views of the window, as transformers reads them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._fill(keys, values)

    def _fill(self, keys: torch.Tensor, values: torch.Tensor, left: int = 0) -> None:
        """A fresh buffer holding `keys` / `values` as the window, `left` free columns before
        it and `ROOM` after."""
        width = keys.shape[-2]
        self.key_buffer = _buffer(keys, left, width)
        self.value_buffer = _buffer(values, left, width)
        self.key_buffer[:, :, left : left + width] = keys
        self.value_buffer[:, :, left : left + width] = values
        self.start, self.end = left, left + width
        self._view()

    def _view(self) -> None:
        self.keys = self.key_buffer[:, :, self.start : self.end]
        self.values = self.value_buffer[:, :, self.start : self.end]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        columns = key_states.shape[-2]
        if self.end + columns > self.key_buffer.shape[-2]:
            self._fill(self.keys, self.values)
        self.key_buffer[:, :, self.end : self.end + columns] = key_states
        self.value_buffer[:, :, self.end : self.end + columns] = value_states
        self.end += columns
        self._view()
        return self.keys, self.values

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put prompts (right-aligned, `keys.shape[-2]` ≤ the window's width) into `slots`."""
        width = keys.shape[-2]
        self.key_buffer[slots, :, self.end - width : self.end] = keys
        self.value_buffer[slots, :, self.end - width : self.end] = values

    def widen(self, columns: int) -> None:
        """Grow the window by `columns` on the left (their contents are masked as padding)."""
        if self.start < columns:
            self._fill(self.keys, self.values, left=columns)
        self.start -= columns
        self._view()

    def trim(self, columns: int) -> None:
        self.start += columns
        self._view()

    def move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy the window of slots `sources` into slots `targets`; the columns left of the
        window keep the finite numbers they held, as padding must."""
        window = slice(self.start, self.end)
        self.key_buffer[targets, :, window] = self.key_buffer[sources, :, window]
        self.value_buffer[targets, :, window] = self.value_buffer[sources, :, window]

    def keep_first(self, count: int) -> None:
        """Give up the slots from `count` on: a view of the buffer, nothing is copied."""
        self.key_buffer = self.key_buffer[:count]
        self.value_buffer = self.value_buffer[:count]
        self._view()

    def add_slots(self, count: int) -> None:
        keys, values = self.keys, self.values
        self._fill(
            torch.cat([keys, keys.new_zeros(count, *keys.shape[1:])]),
            torch.cat([values, values.new_zeros(count, *values.shape[1:])]),
        )


class SlotCache(DynamicCache):
    """The slots of every layer, made from a prefill's `DynamicCache`; passed to the model as
    its cache, so every decode step appends in place."""

    def __init__(self, prefill: DynamicCache) -> None:
        layers = [SlotLayer(layer.keys, layer.values) for layer in filled_layers(prefill)]
        Cache.__init__(self, layers=layers)

    @property
    def slots(self) -> int:
        return int(self.layers[0].keys.shape[0])

    @property
    def width(self) -> int:
        return int(self.layers[0].keys.shape[-2])

    def write(self, slots: list[int], prefill: DynamicCache) -> None:
        """Prompts of a prefill into `slots`, right-aligned with the window (widened first if
        the prompts are wider); the columns left of them are padding for those rows."""
        filled = filled_layers(prefill)
        width = filled[0].keys.shape[-2]
        if width > self.width:
            self.widen(width - self.width)
        if max(slots) >= self.slots:
            self.add_slots(max(slots) + 1 - self.slots)
        index = torch.tensor(slots, device=filled[0].keys.device)
        for layer, source in zip(self._slot_layers(), filled, strict=True):
            layer.write(index, source.keys, source.values)

    def widen(self, columns: int) -> None:
        for layer in self._slot_layers():
            layer.widen(columns)

    def trim(self, columns: int) -> None:
        for layer in self._slot_layers():
            layer.trim(columns)

    def compact(self, live: list[int]) -> list[int]:
        """Keep only the slots `live` (ascending), in the first `len(live)` slots: a live row
        past them moves into a free slot before them, so only those rows are copied. Returns
        the old slot of each slot kept."""
        keep, kept = len(live), set(live)
        holes = [i for i in range(keep) if i not in kept]
        movers = [i for i in live if i >= keep]
        if movers:
            device = self.layers[0].keys.device
            sources = torch.tensor(movers, device=device)
            targets = torch.tensor(holes, device=device)
            for layer in self._slot_layers():
                layer.move(sources, targets)
        for layer in self._slot_layers():
            layer.keep_first(keep)
        order = list(range(keep))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        return order

    def add_slots(self, count: int) -> None:
        for layer in self._slot_layers():
            layer.add_slots(count)

    def _slot_layers(self) -> list[SlotLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlotLayer)]


def _buffer(like: torch.Tensor, left: int, width: int) -> torch.Tensor:
    """Room for `left` + `width` + `ROOM` columns. Only the `left` ones are zeroed: they enter
    the window as padding without being written, and padding must hold finite numbers (a
    masked NaN still poisons attention: 0 × NaN is NaN); every column right of the window is
    written by a decode step before the window reaches it."""
    slots, heads, _, dim = like.shape
    buffer = like.new_empty(slots, heads, left + width + ROOM, dim)
    buffer[:, :, :left] = 0
    return buffer


def filled_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The layers of a cache that hold keys and values (a fresh cache has none yet)."""
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]
