"""LoRA on CPU grouped per adapter (``serving.cpu_lora``) against vLLM's own CPU ops: the
same products for every token of an adapter, in prefill-sized and decode-sized runs and in
both dtypes; no delta for a token of no adapter (vLLM's ops give it the last slot's); and
the plugin that vLLM's engine loads picks the grouped wrapper."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from loraplex.serving.cpu_lora import GROUPED_WRAPPER, GroupedPunicaWrapperCPU, adapter_runs
from tests.helpers import clean_env

SLOTS, RANK, HIDDEN = 3, 8, 64
SLICES = (64, 32, 32)  # a merged q/k/v projection's outputs


def wrappers(token_slots: list[int], prefill: bool):
    """vLLM's wrapper and ours, told the same step: token i uses slot token_slots[i]
    (adapter id slot + 1; -1: none)."""
    ids = [s + 1 if s >= 0 else 0 for s in token_slots]
    mapping = LoRAMapping(ids, ids, is_prefill=prefill)
    slot_ids = list(range(1, SLOTS + 1))
    out = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        w = cls(max_num_batched_tokens=512, max_batches=16, device="cpu")
        w.update_metadata(mapping, slot_ids, SLOTS, 1000)
        out.append(w)
    return out


def stacked(dtype: torch.dtype, gen: torch.Generator):
    """vLLM-shaped stacked weights: per slice, A ``[slots, 1, rank, in]`` and B
    ``[slots, 1, out, rank]``."""
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen).to(dtype) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, n, RANK, generator=gen).to(dtype) for n in SLICES)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "token_slots,prefill",
    [
        ([0] * 100 + [2] * 7 + [1] * 90, True),  # prefill: long runs of three adapters
        ([1, 0, 2, 2, 0, 1], False),  # decode: one token per request, slots interleaved
    ],
)
def test_grouped_products_equal_vllms_for_tokens_of_an_adapter(
    token_slots: list[int], prefill: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = stacked(dtype, gen)
    x = torch.randn(len(token_slots), HIDDEN, generator=gen).to(dtype)
    base = torch.randn(len(token_slots), sum(SLICES), generator=gen).to(dtype)
    theirs, ours = wrappers(token_slots, prefill)
    ys = []
    for w in (theirs, ours):
        y = base.clone()
        w.add_lora_linear(y, x, a, b, 0.5, SLICES)
        ys.append(y)
    assert not torch.equal(ys[1], base)  # the deltas were added
    tol = {"rtol": 0, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.5}
    torch.testing.assert_close(ys[1], ys[0], **tol)
    # the embedding's expand (one slice, no offset) and a lone shrink take the same runs
    h = torch.randn(len(token_slots), RANK, generator=gen).to(dtype)
    for w, y in zip((theirs, ours), ys, strict=True):
        w.add_lora_embedding(y, h, b[0])
    torch.testing.assert_close(ys[1], ys[0], **tol)
    # vLLM's own two-step path (add_shrink into float32 buffers, then add_expand)
    for w, y in zip((theirs, ours), ys, strict=True):
        buffers = tuple(torch.zeros(len(token_slots), RANK) for _ in SLICES)
        w.add_shrink(buffers, x, a, 0.5)
        w.add_expand(y, buffers, b, SLICES, add_inputs=True)
    torch.testing.assert_close(ys[1], ys[0], **tol)


@pytest.mark.parametrize(
    "token_slots",
    [
        [0] * 5 + [-1] * 4 + [2] * 3 + [-1] * 2,  # prefill-like runs
        [0, -1, 2, 0, -1, 2, 1],  # decode-like: slots interleaved with base requests
    ],
)
def test_tokens_of_no_adapter_get_no_delta(token_slots: list[int]) -> None:
    """A base-model request batched with adapter requests that fill every slot: its rows
    stay as the base model made them (vLLM's CPU ops read slot -1 for them, the last
    adapter's, and change them)."""
    gen = torch.Generator().manual_seed(1)
    a, b = stacked(torch.float32, gen)
    x = torch.randn(len(token_slots), HIDDEN, generator=gen)
    base = torch.randn(len(token_slots), sum(SLICES), generator=gen)
    theirs, ours = wrappers(token_slots, prefill=True)
    none = torch.tensor([s < 0 for s in token_slots])
    y_ours, y_theirs = base.clone(), base.clone()
    ours.add_lora_linear(y_ours, x, a, b, 1.0, SLICES)
    theirs.add_lora_linear(y_theirs, x, a, b, 1.0, SLICES)
    assert torch.equal(y_ours[none], base[none])
    assert not torch.equal(y_ours[~none], base[~none])
    torch.testing.assert_close(y_ours[~none], y_theirs[~none], rtol=0, atol=1e-4)


def test_adapter_runs() -> None:
    assert adapter_runs(torch.tensor([2, 2, -1, 0, 0, 0, 2])) == [
        (0, 2, 2),
        (2, 3, -1),
        (3, 6, 0),
        (6, 7, 2),
    ]


def test_vllm_loads_the_plugin_and_it_can_be_turned_off() -> None:
    """vLLM's plugin loading (as its engine process runs it) picks the grouped wrapper;
    ``VLLM_PLUGINS`` without ours leaves vLLM's."""
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "load_general_plugins(); from vllm.platforms import current_platform; "
        "print(current_platform.get_punica_wrapper())"
    )
    for env, want in (({}, GROUPED_WRAPPER), ({"VLLM_PLUGINS": "none"}, "PunicaWrapperCPU")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=clean_env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert out.stdout.strip().splitlines()[-1].endswith(want), out.stdout
