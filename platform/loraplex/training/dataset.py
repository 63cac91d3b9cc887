"""Training examples: JSONL conversations -> token ids and assistant-only labels.

Owns: reading the configured files (any of the three formats, validated with line
numbers), the eval split, the dataset fingerprint logged to MLflow, and tokenization
with the base model's chat template where only assistant tokens carry loss (from the
template's ``{% generation %}`` markers, or by tokenizing each prefix when a template
has none), truncating to ``max_length`` and counting what was truncated.
Does not own: the formats themselves (``loraplex.data.formats``) or training.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.data.formats import Message, read_conversations
from loraplex.errors import InputError
from loraplex.training.config import DataConfig

IGNORE = -100


@dataclass
class Examples:
    train: list[list[Message]] | list[dict[str, Any]]  # conversations, or preference pairs
    eval: list[list[Message]] | list[dict[str, Any]]
    fingerprint: dict[str, Any]


def _digest(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()


def dataset_sha256(data: DataConfig) -> str:
    """The fingerprint a fine-tuning run is tagged with (``loraplex.dataset_sha256``):
    the files, and the sample sizes when the config takes a sample of them."""
    limits = (data.max_examples, data.max_eval_examples)
    extra = "" if limits == (None, None) else f"sample:{limits[0]}:{limits[1]}"
    return _digest([*data.train, *data.eval], extra)


def _sample(rows: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` rows, drawn with ``seed``, in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    chosen = set(random.Random(seed).sample(range(len(rows)), limit))
    return [r for i, r in enumerate(rows) if i in chosen]


def split_and_sample(train: list, evals: list, data: DataConfig, seed: int) -> tuple[list, list]:
    """``data.eval_fraction`` of ``train`` held out when no eval file is given, then the
    seeded samples (``max_examples``, ``max_eval_examples``)."""
    if not evals and data.eval_fraction > 0 and len(train) >= 4:
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_fraction))
        chosen = set(order[:n_eval])
        evals = [c for i, c in enumerate(train) if i in chosen]
        train = [c for i, c in enumerate(train) if i not in chosen]
    return _sample(train, data.max_examples, seed), _sample(evals, data.max_eval_examples, seed + 1)


def load_examples(
    data: DataConfig, seed: int = 0, read: Callable[[Path], list] | None = None
) -> Examples:
    """Every conversation (or, with ``read``, every row it reads: preference pairs) of the
    train (and eval) files; InputError names a bad line."""
    read = read or (lambda p: read_conversations(p, data.format))
    try:
        train = [c for p in data.train for c in read(p)]
        evals = [c for p in data.eval for c in read(p)]
    except ValueError as e:
        raise InputError(str(e)) from None
    train, evals = split_and_sample(train, evals, data, seed)
    fingerprint = {
        "sha256": dataset_sha256(data),
        "train_rows": len(train),
        "eval_rows": len(evals),
        "format": data.format,
        "max_examples": data.max_examples,
        "max_eval_examples": data.max_eval_examples,
        "files": [str(p) for p in [*data.train, *data.eval]],
        # each file's own sha256: the one `loraplex pairs build` prints for its pair file
        "file_sha256": {
            str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in [*data.train, *data.eval]
        },
    }
    return Examples(train, evals, fingerprint)


def _mask_by_prefixes(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Assistant mask for templates without generation markers: each assistant turn is
    what its conversation adds over the prefix before it (with the generation prompt)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(
                messages[:i], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        end = min(
            len(ids),
            len(
                tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            ),
        )
        # the separator a template writes after the turn's end token ("<|im_end|>\n") is
        # not the assistant's to learn, as with {% generation %} markers
        while end > start and not tokenizer.decode([ids[end - 1]]).strip():
            end -= 1
        for j in range(start, end):
            mask[j] = 1
    return list(ids), mask


def tokenize(
    tokenizer, conversations: list[list[Message]], max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Rows of ``input_ids``/``labels`` (loss on assistant tokens only), and how many
    examples were cut at ``max_length``. An example with nothing left to learn from
    after truncation is dropped (and counted as truncated)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the base model's tokenizer has no chat template")
    rows, truncated = [], 0
    for messages in conversations:
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(enc["input_ids"]), list(enc.get("assistant_masks") or [])
        if not any(mask):
            ids, mask = _mask_by_prefixes(tokenizer, messages)
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
        if all(label == IGNORE for label in labels):
            continue
        rows.append({"input_ids": ids, "labels": labels})
    return rows, truncated
