"""The three JSONL formats of chat training data, and conversion between them.

Owns: turning a conversation (a list of ``{"role", "content"}`` messages) into an
``alpaca`` record (instruction/input/output: single-turn only), a ``sharegpt`` record
(``conversations`` of ``{"from": human|gpt|system, "value"}``) or an ``openai`` chat
record (``messages``), and writing JSONL files. Does not own: tokenization or loss
masks (the trainer applies the model's chat template).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

Format = Literal["alpaca", "sharegpt", "openai"]
FORMATS: tuple[Format, ...] = ("alpaca", "sharegpt", "openai")
Message = dict[str, str]

_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def to_record(messages: list[Message], fmt: Format) -> dict[str, Any]:
    if fmt == "openai":
        return {"messages": messages}
    if fmt == "sharegpt":
        return {
            "conversations": [
                {"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages
            ]
        }
    if fmt == "alpaca":
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise ValueError("alpaca holds one user turn and one assistant turn")
        return {
            "instruction": turns[0]["content"],
            "input": "",
            "output": turns[1]["content"],
            **({"system": system[0]} if system else {}),
        }
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_conversations(
    folder: Path, name: str, conversations: list[list[Message]], formats: Iterable[Format] = FORMATS
) -> dict[str, int]:
    """Write ``folder/name.<fmt>.jsonl`` for each format; returns rows per file."""
    return {
        fmt: write_jsonl(folder / f"{name}.{fmt}.jsonl", (to_record(c, fmt) for c in conversations))
        for fmt in formats
    }
