"""The three JSONL formats of chat training data, and conversion between them.

Owns: turning a conversation (a list of ``{"role", "content"}`` messages) into an
``alpaca`` record (instruction/input/output: single-turn only), a ``sharegpt`` record
(``conversations`` of ``{"from": human|gpt|system, "value"}``) or an ``openai`` chat
record (``messages``), and reading (:func:`read_jsonl`: every bad line named) and writing
JSONL files. Does not own: tokenization or loss
masks (the trainer applies the model's chat template).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

Format = Literal["alpaca", "sharegpt", "openai"]
FORMATS: tuple[Format, ...] = ("alpaca", "sharegpt", "openai")
Message = dict[str, str]
T = TypeVar("T")

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


_ROLES = {"system", "user", "assistant"}
_FROM_ROLE = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
_FROM_ROLE |= {"assistant": "assistant", "model": "assistant"}


def detect_format(record: dict[str, Any]) -> Format:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise ValueError(
        "not a known record: expected 'messages' (openai), 'conversations' (sharegpt) "
        "or 'instruction' + 'output' (alpaca)"
    )


def from_record(record: Any, fmt: Format) -> list[Message]:
    """A validated conversation; ValueError says what is wrong in words."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"alpaca record needs a non-empty string {key!r}")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("alpaca 'input' must be a string")
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return [
            *messages,
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    if fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError("sharegpt record needs a non-empty 'conversations' list")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in _FROM_ROLE:
                raise ValueError(f"conversations[{i}]: 'from' must be one of {sorted(_FROM_ROLE)}")
            if not isinstance(t.get("value"), str):
                raise ValueError(f"conversations[{i}]: 'value' must be a string")
            messages.append({"role": _FROM_ROLE[t["from"]], "content": t["value"]})
    elif fmt == "openai":
        raw = record.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ValueError("openai record needs a non-empty 'messages' list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise ValueError(f"messages[{i}]: 'role' must be one of {sorted(_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: 'content' must be a string")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("no assistant turn to learn from")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant turn")
    return messages


def read_jsonl(path: Path, parse: Callable[[Any, int], T]) -> list[T]:
    """Each non-empty line of a JSONL file through ``parse(record, line_number)``; a
    ValueError names the file and the first bad line (``parse`` raises ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out: list[T] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse(json.loads(line), n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def read_conversations(path: Path, fmt: Format | Literal["auto"] = "auto") -> list[list[Message]]:
    """Every conversation in a JSONL file; a ValueError names the first bad line."""
    first: list[str] = []  # the file's format, from its first record

    def parse(record: Any, _: int) -> list[Message]:
        kind = detect_format(record) if fmt == "auto" else fmt
        if first and kind != first[0]:
            raise ValueError(f"{kind} record in a {first[0]} file")
        first[:1] = [kind]
        return from_record(record, kind)

    return read_jsonl(path, parse)
