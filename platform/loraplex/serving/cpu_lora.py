"""vLLM's LoRA arithmetic on CPU, one matrix product per adapter instead of per token.

vLLM 0.29's CPU path (``vllm/lora/ops/torch_ops``) gathers a copy of the adapter's weights
for every token (``weights[token_indices]``), converts it to the output dtype and runs a
batched matrix-vector product: a 470-token prompt through SmolLM2's 30 layers copies
gigabytes per request. Profiled (``benchmarks/adapter_path.py``), that gather, copy and
``bmm`` were three quarters of an adapter request's CPU time. This module owns the
replacement: the batch's tokens are grouped once per engine step by adapter slot (runs of
consecutive tokens as slices; requests of several adapters interleaved as one index per
slot), and each group is one ``mm`` against that adapter's slot.
Tokens of no adapter (index -1) get no delta, as on GPU (vLLM's CPU ops read slot -1,
the last adapter's, for them).

It is installed as a vLLM general plugin (``pyproject.toml``: ``vllm.general_plugins``),
which vLLM loads in every engine process; ``VLLM_PLUGINS`` set to a list without
``loraplex_cpu_lora`` turns it off. It changes nothing on GPU, and nothing but the
arithmetic of LoRA layers on CPU (loading, slots and the logits' LoRA stay vLLM's).
"""

from __future__ import annotations

import logging

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

log = logging.getLogger(__name__)

VLLM_CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
GROUPED_WRAPPER = "loraplex.serving.cpu_lora.GroupedPunicaWrapperCPU"
# runs of at most this many tokens (decode steps) multiply in float32
SMALL_RUN = 64


def adapter_runs(token_indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, end, slot)`` for each run of consecutive tokens of one adapter slot
    (slot -1: no adapter)."""
    slots, counts = torch.unique_consecutive(token_indices, return_counts=True)
    runs: list[tuple[int, int, int]] = []
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        runs.append((start, start + count, slot))
        start += count
    return runs


def adapter_groups(runs: list[tuple[int, int, int]]) -> list[tuple[int, slice | torch.Tensor]]:
    """The rows of each adapter slot in the step (slot -1 left out): a slice per run while
    every slot has one run or any run is long (prefill), else one index tensor per slot
    (decode of requests of several adapters interleaved: one product per adapter, not
    per run)."""
    kept = [r for r in runs if r[2] >= 0]
    slots = sorted({slot for _, _, slot in kept})
    # long runs (prefill) stay slices: gathering and scattering their rows costs more
    # than the extra products (measured: 8 adapters' prefill at 32 requests, -30%)
    if len(kept) == len(slots) or any(end - start > SMALL_RUN for start, end, _ in kept):
        return [(slot, slice(start, end)) for start, end, slot in kept]
    return [
        (slot, torch.tensor([i for a, b, s in kept if s == slot for i in range(a, b)]))
        for slot in slots
    ]


def _slot(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """One adapter's matrix from vLLM's stacked ``[slots, 1, out, in]`` (or
    ``[slots, out, in]``) weights, in ``dtype``."""
    w = weights[slot]
    if w.dim() == 3:
        w = w.squeeze(0)
    return w.to(dtype)


def shrink(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    runs: list[tuple[int, int, int]],
    scale: float,
) -> None:
    """``y[t] = scale * x[t] @ A[slot(t)].T`` per run; rows of no adapter are zeroed."""
    for start, end, slot in runs:
        if slot < 0:
            y[start:end].zero_()
            continue
        w = _slot(weights, slot, y.dtype)
        y[start:end, : w.shape[0]] = scale * torch.mm(x[start:end].to(y.dtype), w.t())


def expand(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    runs: list[tuple[int, int, int]],
    offset: int,
    size: int | None,
    add_inputs: bool,
) -> None:
    """``y[t, offset:offset+size] (+)= x[t] @ B[slot(t)].T`` per run (``size`` None: the
    shorter of the adapter's output and ``y``'s, as vLLM pads); rows of no adapter are
    left as they are."""
    for start, end, slot in runs:
        if slot < 0:
            continue
        w = _slot(weights, slot, y.dtype)
        width = size if size is not None else min(w.shape[0], y.shape[1] - offset)
        out = torch.mm(x[start:end].to(y.dtype), w[:width].t())
        target = y[start:end, offset : offset + width]
        if add_inputs:
            target += out
        else:
            target.copy_(out)


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with its per-token LoRA products grouped per adapter.
    A tensor whose rows are not the step's tokens goes to vLLM's own ops."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs: list[tuple[int, int, int]] = []
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        self.tokens = -1  # no step yet: vLLM's ops

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        indices = self.token_lora_indices
        self.tokens = int(indices.shape[0])
        self.runs = adapter_runs(indices)
        self.groups = adapter_groups(self.runs)

    def _ours(self, x: torch.Tensor) -> bool:
        return x.shape[0] == self.tokens

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kw
    ):
        """Each run's ``y[:, slice] += (x @ A.T * scale) @ B.T`` per slice, in the model's
        dtype (vLLM's float32 buffer is rounded to it before ``B`` anyway)."""
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if buffer is not None or not self._ours(x2):
            return super().add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kw
            )
        for slot, rows in self.groups:
            gathered = isinstance(rows, torch.Tensor)
            xs = x2.index_select(0, rows) if gathered else x2[rows]
            # a few rows: float32 (a bfloat16 mm pays ~17 us of set-up); many: the model's
            dtype = torch.float32 if xs.shape[0] <= SMALL_RUN else y.dtype
            xs = xs.to(dtype)
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
                h = torch.mm(xs, _slot(a, slot, dtype).t())
                if scale != 1.0:
                    h = h * scale
                out = torch.mm(h, _slot(b, slot, dtype)[:size].t()).to(y.dtype)
                if gathered:
                    y2[:, offset : offset + size].index_add_(0, rows, out)
                else:
                    y2[rows, offset : offset + size] += out
                offset += size

    # add_shrink / add_expand (vLLM's own add_lora_linear, when it runs) and the
    # embedding's expand: the same runs, prefill and decode alike
    def _apply_shrink(self, y, x, w_t_all, scale):
        if not self._ours(x):
            return super()._apply_shrink(y, x, w_t_all, scale)
        shrink(y.view(-1, y.shape[-1]), x, w_t_all, self.runs, scale)

    def _apply_expand(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs=True):
        if not self._ours(x):
            return super()._apply_expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs)
        expand(y, x, w_t_all, self.runs, y_offset, y_slice_size, add_inputs)

    def _expand_prefill(self, y, x, w_t_all, add_inputs):
        if not self._ours(x):
            return super()._expand_prefill(y, x, w_t_all, add_inputs)
        expand(y, x, w_t_all, self.runs, 0, None, add_inputs)

    def _expand_decode(self, y, x, w_t_all, add_inputs):
        if not self._ours(x):
            return super()._expand_decode(y, x, w_t_all, add_inputs)
        expand(y, x, w_t_all, self.runs, 0, None, add_inputs)


def register() -> None:
    """vLLM general plugin: on CPU, vLLM's LoRA layers use :class:`GroupedPunicaWrapperCPU`.
    Loaded more than once per process by vLLM; each load is the same."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform = type(current_platform)
    current = platform.get_punica_wrapper()
    if current == GROUPED_WRAPPER:
        return
    if current != VLLM_CPU_WRAPPER:
        log.warning("loraplex: vLLM's CPU LoRA wrapper is %s, not replaced", current)
        return
    platform.get_punica_wrapper = classmethod(lambda cls: GROUPED_WRAPPER)  # type: ignore[method-assign]
