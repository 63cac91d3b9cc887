"""Preference pairs: the ``prompt``/``chosen``/``rejected`` JSONL that DPO and ORPO train on.

Owns: reading the pair files (``data.format: preference``), each row checked with its
file and line (a field missing or empty, chosen identical to rejected), the rows in TRL's
conversational form (``prompt`` a list of messages, ``chosen``/``rejected`` one assistant
message each; split, sample and fingerprint as for conversations, by
``dataset.load_examples``), and the check that every prompt fits ``data.max_length``
under the base model's chat template.
A row's ``prompt`` is a string (one user turn) or a list of messages; ``chosen`` and
``rejected`` are strings or one assistant message (``[{"role": "assistant", ...}]``).
Does not own: building pairs from an adapter's answers, or training on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraplex.data.formats import read_jsonl
from loraplex.errors import InputError
from loraplex.training.config import DataConfig
from loraplex.training.dataset import Examples, load_examples

ROLES = ("system", "user", "assistant")


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{field} is empty")
        return [{"role": "assistant" if field != "prompt" else "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be a non-empty string or list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{field}: each message needs a role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"{field}: a message has no content")
        out.append({"role": m["role"], "content": m["content"]})
    if field != "prompt" and (len(out) != 1 or out[0]["role"] != "assistant"):
        raise ValueError(f"{field} must be one assistant message")
    return out


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """A pair file's rows in conversational form; a bad row raises ValueError naming
    ``file:line``."""

    def parse(row: Any, n: int) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise ValueError(f"no {key!r} (a pair row has prompt, chosen and rejected)")
        pair = {k: _messages(row[k], k) for k in ("prompt", "chosen", "rejected")}
        if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
            raise ValueError("chosen and rejected are the same answer")
        return {**pair, "line": f"{Path(path).name}:{n}"}

    return read_jsonl(path, parse)


def load_pairs(data: DataConfig, seed: int = 0) -> Examples:
    """Every pair of the train (and eval) files, split and sampled as conversations are;
    InputError names a bad row."""
    return load_examples(data, seed, read_pairs)


def check_lengths(tokenizer, pairs: list[dict[str, Any]], max_length: int) -> None:
    """Every prompt, as the chat template writes it, within ``max_length`` tokens with
    room for an answer; the base model has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the base model's tokenizer has no chat template (DPO/ORPO need one)")
    for pair in pairs:
        ids = tokenizer.apply_chat_template(
            pair["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if len(ids) >= max_length:
            raise InputError(
                f"{pair['line']}: the prompt is {len(ids)} tokens, data.max_length is "
                f"{max_length}: nothing of the answers would be trained on"
            )


def as_trl_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows TRL's trainers read (the ``line`` label dropped)."""
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
