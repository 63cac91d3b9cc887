"""`loraplex world generate`: seeded, complete, BEIR-shaped, and never overwrites."""

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import LORAPLEX, clean_env, one_line_error, run_cli

from loraplex.data.formats import FORMATS, read_conversations
from loraplex.evaluation.scorers import json_compliant, normalize_answer
from loraplex.prompts import JSON_ANSWER_SCHEMA, JSON_INSTRUCTION, NOT_FOUND, TICKET_CATEGORIES
from loraplex.world.generate import WorldSize, generate_world
from loraplex.world.pretraining import STAGES

SMALL = WorldSize(families=4, tickets=60, pretrain={s: 20 for s in STAGES})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "seed5"
    generate_world(5, out, size=SMALL, pretraining=True)
    return out


def test_beir_layout_and_gold_documents(world: Path):
    corpus = {d["_id"]: d for d in _jsonl(world / "corpus.jsonl")}
    queries = _jsonl(world / "queries.jsonl")
    assert (
        len(queries)
        == json.loads((world / "manifest.json").read_text())["questions"]["train"]
        + json.loads((world / "manifest.json").read_text())["questions"]["test"]
    )
    for split in ("train", "test"):
        lines = (world / "qrels" / f"{split}.tsv").read_text().splitlines()
        assert lines[0] == "query-id\tcorpus-id\tscore" and len(lines) > 1
    for q in queries:
        gold = corpus[q["metadata"]["gold_doc"]]
        # The gold document states the answer, next to the product's name.
        assert f"of the {q['metadata']['entity']} is {q['metadata']['answer']}." in gold["text"]
        assert (world / "docs" / f"{gold['_id']}.md").exists()
    # Test questions are about products no training question mentions.
    train = {q["metadata"]["entity"] for q in queries if q["metadata"]["split"] == "train"}
    test = {q["metadata"]["entity"] for q in queries if q["metadata"]["split"] == "test"}
    assert train and test and not train & test


def test_near_duplicate_products_and_distractor_text(world: Path):
    corpus = _jsonl(world / "corpus.jsonl")
    names = sorted({d["metadata"]["entity"] for d in corpus if d["metadata"]["entity"]})
    families = [n.split()[0] for n in names]
    assert any(families.count(f) > 1 for f in families)  # "Velmo X200" and "Velmo X300"
    assert any(d["metadata"]["entity"] is None for d in corpus)  # company documents


def test_datasets_in_three_formats(world: Path):
    for task in ("json_answer", "ticket_classify", "raft_json"):
        for split in ("train", "test"):
            rows = {
                fmt: _jsonl(world / "datasets" / task / f"{split}.{fmt}.jsonl") for fmt in FORMATS
            }
            assert len({len(r) for r in rows.values()}) == 1 and rows["openai"]
            first = rows["openai"][0]["messages"]
            assert rows["alpaca"][0]["instruction"] == first[0]["content"]
            assert rows["alpaca"][0]["output"] == first[1]["content"]
            assert rows["sharegpt"][0]["conversations"][1] == {
                "from": "gpt",
                "value": first[1]["content"],
            }
        # the trainer reads each format (named or detected) as the same conversations
        for split in ("train", "test"):
            files = {fmt: world / "datasets" / task / f"{split}.{fmt}.jsonl" for fmt in FORMATS}
            expected = read_conversations(files["openai"], "openai")
            for fmt, path in files.items():
                assert read_conversations(path, fmt) == expected, (task, fmt)
                assert read_conversations(path, "auto") == expected, (task, fmt)
    with pytest.raises(ValueError, match=r"train\.openai\.jsonl:1: alpaca record needs"):
        read_conversations(world / "datasets" / "json_answer" / "train.openai.jsonl", "alpaca")
    for row in _jsonl(world / "datasets" / "json_answer" / "train.openai.jsonl"):
        assert json_compliant(row["messages"][1]["content"], JSON_ANSWER_SCHEMA)
    labels = {
        r["messages"][1]["content"]
        for r in _jsonl(world / "datasets" / "ticket_classify" / "train.openai.jsonl")
    }
    assert labels == set(TICKET_CATEGORIES)
    raft = _jsonl(world / "datasets" / "raft_json" / "train.openai.jsonl")
    assert all(r["messages"][0]["content"].count("<source id=") == 3 for r in raft)
    json_rows = _jsonl(world / "datasets" / "json_answer" / "train.openai.jsonl")
    for task, rows in (("raft_json", raft), ("json_answer", json_rows)):
        cited = 0
        for r in rows:  # the cited number is the passage that holds the answer
            target = json.loads(r["messages"][1]["content"])
            passages = dict(
                re.findall(
                    r'<source id="(\d+)" doc="[^"]+">\n(.*?)\n</source>',
                    r["messages"][0]["content"],
                    re.S,
                )
            )
            for n in target["sources"]:
                assert target["answer"] in passages[str(n)], (task, r)
                cited += 1
        assert cited > len(rows) / 2, task


def test_json_answer_training_reads_counterfactual_copies_and_raft_keeps_gold_80pct(world: Path):
    """The README's promises for the training sets: per training question, the question
    over its document, then two over counterfactual copies (facts redrawn: the answer is
    in the copy, not in the world), and for about a third a fourth without sources; RAFT
    rows hold the gold passage about 80% of the time, else answer that the sources do
    not say."""
    questions = [q for q in _jsonl(world / "queries.jsonl") if q["metadata"]["split"] == "train"]
    rows = _jsonl(world / "datasets" / "json_answer" / "train.openai.jsonl")
    corpus = {d["_id"]: d["text"] for d in _jsonl(world / "corpus.jsonl")}

    def parts(row: dict) -> tuple[str, dict, dict[str, str]]:
        user, answer = row["messages"][0]["content"], json.loads(row["messages"][1]["content"])
        passages = dict(
            re.findall(r'<source id="(\d+)" doc="[^"]+">\n(.*?)\n</source>', user, re.S)
        )
        return user, answer, passages

    i, closed_book, recalled = 0, 0, 0
    for q in questions:
        user, answer, passages = parts(rows[i])
        assert q["text"] in user and answer == {"answer": q["metadata"]["answer"], "sources": [1]}
        assert passages["1"] == corpus[q["metadata"]["gold_doc"]].strip()
        for row in rows[i + 1 : i + 3]:  # the two counterfactual copies
            _, answer, passages = parts(row)
            (cited,) = answer["sources"]
            assert answer["answer"] in passages[str(cited)]
            assert passages[str(cited)] != corpus[q["metadata"]["gold_doc"]].strip()
            recalled += answer["answer"] == q["metadata"]["answer"]
        i += 3
        if i < len(rows) and "<source" not in rows[i]["messages"][0]["content"]:
            assert json.loads(rows[i]["messages"][1]["content"])["sources"] == []
            closed_book, i = closed_book + 1, i + 1
    assert i == len(rows)
    assert 0.2 <= closed_book / len(questions) <= 0.47, closed_book
    assert recalled <= 0.1 * 2 * len(questions), recalled  # redrawn facts, rarely the same

    raft = _jsonl(world / "datasets" / "raft_json" / "train.openai.jsonl")
    with_gold = [r for r in raft if json.loads(r["messages"][1]["content"])["sources"]]
    assert 0.65 <= len(with_gold) / len(raft) <= 0.95, len(with_gold)
    for r in raft:
        if r not in with_gold:
            assert json.loads(r["messages"][1]["content"])["answer"] == NOT_FOUND


def test_pretraining_text_has_no_world_facts_json_or_tickets(world: Path):
    text = (world / "pretrain" / "corpus.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert any("text" in r for r in records) and any("messages" in r for r in records)
    assert JSON_INSTRUCTION.split(":")[0] not in text  # never asked for JSON
    assert not any(c in text for c in ("Classify the support ticket", "Ticket:"))
    for q in _jsonl(world / "queries.jsonl"):
        assert q["metadata"]["entity"] not in text  # no product of the world at all
    # JSON is only ever text to repeat, never the reply to a question
    turns = [
        (r["messages"][i - 1]["content"], m["content"])
        for r in records
        if "messages" in r
        for i, m in enumerate(r["messages"])
        if m["role"] == "assistant"
    ]
    json_replies = [(u, a) for u, a in turns if a.lstrip().startswith("{")]
    assert json_replies and all(u == f"Repeat the text.\n\nText: {a}" for u, a in json_replies)


def test_seeds_are_reproducible_and_different(tmp_path: Path):
    a = generate_world(11, tmp_path / "a", size=SMALL)
    b = generate_world(11, tmp_path / "b", size=SMALL)
    c = generate_world(12, tmp_path / "c", size=SMALL)
    assert a == b
    assert (tmp_path / "a" / "corpus.jsonl").read_text() == (
        tmp_path / "b" / "corpus.jsonl"
    ).read_text()
    # the pretraining text draws from its own stream: with it, everything else is the same
    d = generate_world(11, tmp_path / "d", size=SMALL, pretraining=True)
    assert d == a | {"pretrain_records": d["pretrain_records"]} and d["pretrain_records"] > 0
    assert not (tmp_path / "a" / "pretrain").exists()
    for name in ("corpus.jsonl", "queries.jsonl", "tickets.jsonl"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    for f in (tmp_path / "a" / "datasets").rglob("*.jsonl"):
        assert (tmp_path / "d" / f.relative_to(tmp_path / "a")).read_bytes() == f.read_bytes()
    facts_a = {
        normalize_answer(q["metadata"]["answer"]) for q in _jsonl(tmp_path / "a" / "queries.jsonl")
    }
    facts_c = {
        normalize_answer(q["metadata"]["answer"]) for q in _jsonl(tmp_path / "c" / "queries.jsonl")
    }
    assert c["company"] != a["company"] or facts_a != facts_c


def test_cli_generate_and_bad_input(tmp_path: Path):
    env = clean_env(LORAPLEX_HOME=str(tmp_path / "home"))
    out = tmp_path / "w"
    proc = run_cli("world", "generate", "--seed", "2", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "world seed 2 written to" in proc.stdout
    before = (out / "corpus.jsonl").read_text()

    for args, expected in [
        (["--seed", "-1"], "-1 is not in the range x>=0"),
        (["--seed", "1.5"], "'1.5' is not a valid integer"),
        (["--seed", "abc"], "'abc' is not a valid integer"),
    ]:
        proc = run_cli("world", "generate", *args, "--out", str(tmp_path / "x"), env=env)
        assert proc.returncode == 2 and expected in one_line_error(proc)
        assert not (tmp_path / "x").exists()

    proc = run_cli("world", "generate", "--seed", "3", "--out", str(out), env=env)
    assert proc.returncode == 2
    assert "exists and is not empty (use --force" in one_line_error(proc)
    assert (out / "corpus.jsonl").read_text() == before  # untouched

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # root writes anywhere: as root the command runs without the capability to override
    # file permissions, as any other user would
    drop = ["dac_override", "dac_read_search"]
    as_user = (
        ["setpriv", f"--bounding-set=-{',-'.join(drop)}", f"--inh-caps=-{',-'.join(drop)}"]
        if os.geteuid() == 0
        else []
    )
    proc = subprocess.run(
        [*as_user, LORAPLEX, "world", "generate", "--out", str(locked / "w")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "permission denied" in one_line_error(proc)
    assert list(locked.iterdir()) == []

    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    proc = run_cli("world", "generate", "--out", str(a_file), env=env)
    assert proc.returncode == 2 and "is not a folder" in one_line_error(proc)
    assert a_file.read_text() == "keep me"

    proc = run_cli("world", "generate", "--seed", "3", "--out", str(out), "--force", env=env)
    assert proc.returncode == 0 and (out / "corpus.jsonl").read_text() != before
    assert not list(tmp_path.glob(".w.*"))  # no staging folders left behind


def test_question_prompt_layouts() -> None:
    """With sources: the question, the fenced sources, the instruction, the question
    again; ``question_first=False`` is the earlier layout (the question once, last)."""
    from loraplex.prompts import CITE_INSTRUCTION, SOURCES_HEADER, Source, question_prompt

    sources = [Source("d1", "The Velmo X200 costs 12 dollars.")]
    last = question_prompt("Price of the Velmo X200?", sources, question_first=False)
    assert last.startswith(SOURCES_HEADER)
    assert last.count("Question: Price of the Velmo X200?") == 1
    assert last.index(CITE_INSTRUCTION) < last.index("Question:")
    assert question_prompt("Price of the Velmo X200?", sources) == (
        "Question: Price of the Velmo X200?\n\n" + last
    )
    # without sources there is nothing to put the question before
    assert question_prompt("Hi?") == question_prompt("Hi?", question_first=False) == "Question: Hi?"
