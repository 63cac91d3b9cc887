"""Ingestion and search against real Milvus Lite (and a real Milvus gRPC server), with
the bundled MiniLM model: formats, idempotent upserts, deletes, the three search modes,
filters, and every bad input the retrieval issue lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, one_line_error, start_milvus_server

GUIDE = """# Kettle guide

The Brava kettle boils water in three minutes.

## Cleaning

Descale the Brava kettle every month with vinegar.

## Safety

Never open the lid while the water boils.
"""


def make_pdf(path: Path, text: str, title: str = "", password: str | None = None) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.multi_cell(0, 10, text)
    if title:
        pdf.set_title(title)
    if password:
        pdf.set_encryption(owner_password=password, user_password=password)
    pdf.output(str(path))


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("knowledge")
    (root / "guide.md").write_text(GUIDE)
    (root / "notes.txt").write_text("The warehouse in Zanbel ships orders on Mondays.\n")
    (root / "faq.html").write_text(
        "<html><head><title>FAQ</title><script>var x=1;</script></head><body>"
        "<h1>Questions</h1><p>Refunds take <b>five</b> working days.</p>"
        "<ul><li>Returns need the original box.</li></ul></body></html>"
    )
    make_pdf(root / "manual.pdf", "The Orbin lamp uses a 40 watt bulb.", title="Orbin manual")
    (root / "more").mkdir()
    (root / "more" / "corpus.jsonl").write_text(
        json.dumps({"_id": "policy-1", "title": "Warranty", "text": "Warranty lasts 24 months."})
        + "\n"
        + json.dumps({"_id": "policy-2", "title": "Hotline", "text": "Call extension 512."})
        + "\n"
    )
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retrieval_home")


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point in this process (the embedder stays loaded between calls)."""
    from loraplex.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["--home", str(home), *args])
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def collection_ids(home: Path, collection: str = "kb") -> dict[str, str]:
    """chunk id -> content hash, read straight from Milvus."""
    from loraplex.config import load_settings
    from loraplex.retrieval.store import KnowledgeStore

    settings = load_settings(overrides=[f"home={home}"])
    with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
        if collection not in store.collections():
            return {}
        store.info(collection)
        rows = store.client.query(
            collection, filter='doc_id != ""', output_fields=["content_hash"], limit=16384
        )
    return {r["id"]: r["content_hash"] for r in rows}


def test_ingest_every_format_then_search_cites_sources(capsys, home: Path, knowledge: Path) -> None:
    code, out, err = cli(capsys, home, "ingest", str(knowledge), "-c", "kb", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["created"] is True
    assert summary["files"] == 5
    assert summary["documents"] == 6  # md, txt, html, pdf, and two JSONL lines
    assert summary["added"] >= 6 and summary["updated"] == summary["removed"] == 0
    assert [Path(p).name for p, _ in summary["skipped"]] == ["logo.png"]

    for mode in ("dense", "bm25", "hybrid"):
        code, out, err = cli(
            capsys,
            home,
            "search",
            "What bulb does the Orbin lamp use?",
            "-c",
            "kb",
            "--mode",
            mode,
            "-k",
            "3",
            "--json",
        )
        assert code == 0, err
        hits = json.loads(out)
        assert hits[0]["doc_id"] == "manual", (mode, hits)
        assert hits[0]["source"].endswith("manual.pdf")
        assert "40 watt" in hits[0]["text"]
        assert hits[0]["title"] == "Orbin manual"

    # hybrid is the documented fusion of the two rankings, not either one: each mode asked
    # for max(4k, 20) candidates, then sum of w / (rrf_k + rank), rrf_k 10, weights 1 and 1
    # (BM25 3 when the query holds an identifier); a query BM25 cannot answer (no shared
    # word) still finds its document through the dense vote
    def ranked(query: str, mode: str, k: int) -> list[tuple[str, float]]:
        code, out, err = cli(
            capsys, home, "search", query, "-c", "kb", "--mode", mode, "-k", str(k), "--json"
        )
        assert code == 0, err
        return [(h["chunk_id"], h["score"]) for h in json.loads(out)]

    for query, bm25_weight in (
        ("How do I get my money back?", 1),
        ("zanbel dispatch day", 1),
        ("extension 512", 3),
    ):
        fused: dict[str, float] = {}
        for mode, weight in (("dense", 1), ("bm25", bm25_weight)):
            for rank, (chunk, _) in enumerate(ranked(query, mode, 20), 1):
                fused[chunk] = fused.get(chunk, 0) + weight / (10 + rank)
        expected = sorted(fused.items(), key=lambda kv: -kv[1])[:3]
        got = ranked(query, "hybrid", 3)
        assert [c for c, _ in got] == [c for c, _ in expected], (query, got, expected)
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-4)
    assert ranked("How do I get my money back?", "bm25", 3) == []
    assert ranked("How do I get my money back?", "hybrid", 1)[0][0].startswith("faq")

    code, out, _ = cli(capsys, home, "search", "How long do refunds take?", "-c", "kb", "--json")
    hit = json.loads(out)[0]
    assert hit["doc_id"] == "faq" and "five working days" in hit["text"]
    assert "var x" not in hit["text"]  # scripts are not text

    code, out, _ = cli(capsys, home, "search", "warranty months", "-c", "kb", "--json")
    assert json.loads(out)[0]["doc_id"] == "policy-1"

    # filters are Milvus expressions over the chunk metadata
    code, out, _ = cli(
        capsys, home, "search", "kettle", "-c", "kb", "--filter", 'doc_id == "notes"', "--json"
    )
    assert {h["doc_id"] for h in json.loads(out)} == {"notes"}

    # the plain output: rank, score, doc id, source and the chunk's heading
    code, out, _ = cli(capsys, home, "search", "descale the kettle", "-c", "kb", "-k", "1")
    assert code == 0
    assert out.startswith("[1] ") and "guide" in out and "Kettle guide > Cleaning" in out


def test_reingest_is_idempotent_and_a_changed_file_replaces_exactly_its_chunks(
    capsys, home: Path, knowledge: Path, tmp_path: Path
) -> None:
    before = collection_ids(home)
    code, out, err = cli(capsys, home, "ingest", str(knowledge), "-c", "kb", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["added"], s["updated"], s["removed"], s["unchanged"]) == (0, 0, 0, len(before))
    assert collection_ids(home) == before

    # change the guide: one section edited, one removed; small chunks make three of them
    edited = tmp_path / "kb"
    edited.mkdir()
    (edited / "guide.md").write_text(
        GUIDE.replace("every month", "every week").split("## Safety")[0]
    )
    code, out, err = cli(
        capsys,
        home,
        "-s",
        "retrieval.chunk_size=100",
        "-s",
        "retrieval.chunk_overlap=0",
        "ingest",
        str(edited / "guide.md"),
        "-c",
        "kb",
        "--json",
    )
    assert code == 0, err
    s = json.loads(out)
    after = collection_ids(home)
    guide_before = {k for k in before if k.startswith("guide#")}
    guide_after = {k for k in after if k.startswith("guide#")}
    # three sections before (a chunk never spans two); now the first as it was, Cleaning
    # edited in place, Safety gone
    assert len(guide_before) == 3 and len(guide_after) == 2
    assert (s["added"], s["updated"], s["removed"], s["unchanged"]) == (0, 1, 1, 1)
    assert sorted(guide_before)[0] == sorted(guide_after)[0]
    assert guide_after - guide_before == {sorted(guide_after)[1]}
    # every other document is untouched, chunk for chunk
    assert {k: v for k, v in after.items() if not k.startswith("guide#")} == {
        k: v for k, v in before.items() if not k.startswith("guide#")
    }
    code, out, _ = cli(capsys, home, "search", "descale", "-c", "kb", "--mode", "bm25", "--json")
    texts = [h["text"] for h in json.loads(out) if h["doc_id"] == "guide"]
    assert any("every week" in t for t in texts) and not any("every month" in t for t in texts)

    code, out, err = cli(capsys, home, "ingest", "--delete", "guide", "-c", "kb")
    assert code == 0, err
    assert f"{len(guide_after)} chunks removed" in out
    remaining = collection_ids(home)
    assert not any(k.startswith("guide#") for k in remaining)
    assert len(remaining) == len(after) - len(guide_after)


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "binary": tmp_path / "blob.txt",
        "garbage": tmp_path / "noise.md",
        "empty": tmp_path / "empty.md",
        "encrypted": tmp_path / "secret.pdf",
        "broken_pdf": tmp_path / "broken.pdf",
        "bad_jsonl": tmp_path / "rows.jsonl",
        "big": tmp_path / "big.txt",
        "deep_jsonl": tmp_path / "deep.jsonl",
    }
    files["binary"].write_bytes(bytes(range(256)) * 4)
    files["garbage"].write_text("\x01\x02\x03\x04\x05\x06\x07\x08" * 200)
    files["empty"].write_text("")
    make_pdf(files["encrypted"], "secret text", password="pw")
    files["broken_pdf"].write_bytes(b"%PDF-1.4\n garbage that is not a pdf body\n")
    files["bad_jsonl"].write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": \n')
    files["big"].write_text("word " * 300_000)
    files["deep_jsonl"].write_text('{"_id": "d", "text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return files


EXPECTED = {
    "binary": "binary file",
    "garbage": "garbage",
    "empty": "empty file",
    "encrypted": "encrypted PDF",
    "broken_pdf": "unreadable PDF",
    "bad_jsonl": "line 2: not JSON",
    "big": "over the",
    "deep_jsonl": "nested too deeply",
}


def test_bad_files_get_one_line_errors_and_nothing_stored_is_lost(
    capsys, home: Path, knowledge: Path, bad_files: dict[str, Path]
) -> None:
    cli(capsys, home, "ingest", str(knowledge), "-c", "kb")
    before = collection_ids(home)
    assert before
    for name, path in bad_files.items():
        code, _, err = cli(
            capsys, home, "-s", "retrieval.max_file_mb=1", "ingest", str(path), "-c", "kb"
        )
        proc = subprocess.CompletedProcess([], code, "", err)
        assert code == 2, (name, err)
        line = one_line_error(proc)
        assert EXPECTED[name] in line and path.name in line, (name, line)
    # inside a folder the same files are skipped with their reasons, and good ones go in
    folder = bad_files["binary"].parent
    (folder / "good.md").write_text("# Good\n\nThe Velo bike has 21 gears.\n")
    code, out, err = cli(
        capsys, home, "-s", "retrieval.max_file_mb=1", "ingest", str(folder), "-c", "kb", "--json"
    )
    assert code == 0, err
    s = json.loads(out)
    assert s["documents"] == 1 and s["added"] == 1
    reasons = {Path(p).name: r for p, r in s["skipped"]}
    assert set(reasons) == {p.name for p in bad_files.values()}
    after = collection_ids(home)
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(after) == len(before) + 1


def test_search_errors_are_one_line(capsys, home: Path, knowledge: Path) -> None:
    cli(capsys, home, "ingest", str(knowledge), "-c", "kb")
    before = collection_ids(home)
    cases = [
        (("search", "x", "-c", "nope"), "unknown collection 'nope'"),
        (("search", "x", "-c", "kb", "--filter", 'doc_id ==== "a"'), "malformed filter expression"),
        (
            ("search", "x", "-c", "kb", "--filter", "no_such_field > 3"),
            "malformed filter expression",
        ),
        (("search", "x", "-c", "bad-name!"), "collection name"),
        (("search", "   ", "-c", "kb"), "the query is empty"),
        (("ingest", "/no/such/folder", "-c", "kb"), "no such file or folder"),
        (("ingest", str(knowledge / "logo.png"), "-c", "kb"), "unsupported file type"),
        (("ingest", "--delete", "guide", "-c", "nope"), "unknown collection"),
    ]
    for args, expected in cases:
        code, _, err = cli(capsys, home, *args)
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert code == 2 and expected in line, (args, line)
    assert collection_ids(home) == before


def test_embedding_dimension_mismatch_is_refused(capsys, home: Path, knowledge: Path) -> None:
    from loraplex.config import load_settings
    from loraplex.retrieval.store import KnowledgeStore

    settings = load_settings(overrides=[f"home={home}"])
    with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
        store.ensure("other_model", "some/other-model", 8)
    code, _, err = cli(capsys, home, "ingest", str(knowledge), "-c", "other_model")
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 2 and "8-d vectors from some/other-model" in line and "384-d" in line
    assert collection_ids(home, "other_model") == {}


def test_locked_lite_data_dir_names_the_process_holding_it(capsys, tmp_path: Path) -> None:
    from loraplex.config import load_settings

    home = tmp_path / "home"  # a data dir this test process has never opened
    settings = load_settings(overrides=[f"home={home}"])
    Path(settings.milvus.uri).parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pymilvus import MilvusClient\n"
            f"MilvusClient({settings.milvus.uri!r})\nprint('open', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        before_files = sorted(p.name for p in Path(settings.milvus.uri).iterdir())
        code, _, err = cli(capsys, home, "search", "kettle", "-c", "kb")
        line = one_line_error(subprocess.CompletedProcess([], code, "", err))
        assert code == 1, line
        assert f"in use by pid {holder.pid}" in line and "one process per data dir" in line
        assert sorted(p.name for p in Path(settings.milvus.uri).iterdir()) == before_files
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_milvus_server_that_does_not_answer(capsys, home: Path) -> None:
    port = free_port()
    code, _, err = cli(capsys, home, "-s", f"milvus.uri=http://127.0.0.1:{port}", "search", "x")
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 1 and "does not answer" in line and str(port) in line


def test_same_code_against_a_milvus_server_by_uri(
    capsys, home: Path, knowledge: Path, tmp_path: Path
) -> None:
    """A real Milvus gRPC server (Milvus Lite's server mode) on 127.0.0.1, reached by URI."""
    port = free_port()
    server = start_milvus_server(tmp_path / "server-data", port)
    try:
        uri = f"milvus.uri=http://127.0.0.1:{port}"
        code, out, err = cli(
            capsys, home, "-s", uri, "ingest", str(knowledge), "-c", "remote", "--json"
        )
        assert code == 0, err
        assert json.loads(out)["documents"] == 6
        code, out, err = cli(
            capsys, home, "-s", uri, "search", "Orbin lamp bulb", "-c", "remote", "--json"
        )
        assert code == 0, err
        assert json.loads(out)[0]["doc_id"] == "manual"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_eval_retrieval_on_a_generated_world(capsys, home: Path, tmp_path: Path) -> None:
    """The BEIR evaluation on a freshly drawn world: a table, JSON and one MLflow run."""
    import mlflow

    from loraplex.world.generate import WorldSize, generate_world

    world = tmp_path / "world"
    generate_world(
        21,
        world,
        size=WorldSize(families=4, tickets=12, pretrain={"copy": 1}),
    )
    code, out, err = cli(capsys, home, "eval", "retrieval", "--data", str(world), "--json")
    assert code == 0, err
    result = json.loads(out)
    metrics = result["metrics"]
    assert set(metrics) == {"dense", "bm25", "hybrid"}
    for m in metrics.values():
        assert 0.0 <= m["ndcg_at_10"] <= 1.0 and m["recall_at_10"] >= m["recall_at_1"]
    assert metrics["hybrid"]["recall_at_5"] >= 0.9
    assert (
        metrics["hybrid"]["ndcg_at_10"]
        >= max(metrics["dense"]["ndcg_at_10"], metrics["bm25"]["ndcg_at_10"]) - 1e-9
    )
    assert result["collection"] == "eval_world"

    from loraplex.config import load_settings

    mlflow.set_tracking_uri(load_settings(overrides=[f"home={home}"]).mlflow.tracking_uri)
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.metrics["hybrid.ndcg_at_10"] == pytest.approx(metrics["hybrid"]["ndcg_at_10"])
    assert run.data.tags["loraplex.kind"] == "eval-retrieval"

    # the table form, and a second run that writes nothing new, beside the real-text set
    stdlib = REPO / "benchmarks" / "data" / "stdlib-docs"
    args = ["eval", "retrieval", "--data", str(world), "--data", str(stdlib), "--no-mlflow"]
    code, out, err = cli(capsys, home, *args)
    assert code == 0, err
    assert "0 added, 0 updated, 0 removed" in out and "hybrid" in out and "ndcg@10" in out
    assert "eval_world" in out and "eval_stdlib_docs" in out and out.count("ndcg@10") == 2
    code, out, err = cli(capsys, home, *args, "--json")
    assert code == 0, err
    world_run, real = json.loads(out)
    assert (world_run["collection"], real["collection"]) == ("eval_world", "eval_stdlib_docs")
    # real English: hybrid keeps up with the better single mode, BM25 does not drown it
    m = real["metrics"]
    assert m["hybrid"]["recall_at_5"] >= 0.95
    assert (
        m["hybrid"]["ndcg_at_10"] >= max(m["dense"]["ndcg_at_10"], m["bm25"]["ndcg_at_10"]) - 0.01
    )
    code, _, err = cli(capsys, home, *args, "-c", "one")
    assert code == 2 and "one --data folder only" in err

    (world / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq-unknown\tdoc\t1\n")
    code, _, err = cli(capsys, home, "eval", "retrieval", "--data", str(world))
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert code == 2 and "q-unknown" in line and "test.tsv:2" in line


THREE = {
    "observatory.md": "# The observatory\n\nThe hill observatory opens its dome on clear "
    "nights; visitors look at Saturn through the main telescope.\n",
    "teapots.md": "# Teapot works\n\nThe works glazes every teapot in cobalt blue before "
    "the second firing.\n",
    "ferry.md": "# Ferry timetable\n\nThe ferry leaves the harbour at seven and returns "
    "at noon; what is on the timetable is the only schedule there is.\n",
    "codes.md": "# Urven E1000\n\nThe Urven E1000 kettle has a warranty of 36 months.\n",
    "code.md": "# Urven E100\n\nThe Urven E100 kettle has a warranty of 12 months.\n",
}


def _three_docs(root: Path) -> Path:
    docs = root / "three"
    docs.mkdir()
    for name, text in THREE.items():
        (docs / name).write_text(text)
    return docs


def _ranked(r, query: str, mode: str, collection: str = "three") -> list[str]:
    from loraplex.retrieval.retriever import SearchRequest

    hits = r.search(SearchRequest(query=query, collection=collection, mode=mode, top_k=5))
    return [h.doc_id for h in hits]


@pytest.mark.parametrize("backend", ["lite", "server"])
def test_english_analysis_under_bm25(backend: str, tmp_path: Path) -> None:
    """Stems, stop words and exact identifiers, the same on Milvus Lite and a server:
    a small knowledge base asked an ordinary question ranks the right page first."""
    from loraplex.config import load_settings
    from loraplex.retrieval.analysis import analyze
    from loraplex.retrieval.retriever import Retriever

    assert analyze("glaze", "english-snowball-1") == analyze("glazes", "english-snowball-1")
    assert analyze("What is the", "english-snowball-1") == ""
    server = None
    overrides = [f"home={tmp_path / 'home'}"]
    if backend == "server":
        port = free_port()
        server = start_milvus_server(tmp_path / "server-data", port)
        overrides.append(f"milvus.uri=http://127.0.0.1:{port}")
    try:
        with Retriever(load_settings(overrides=overrides)) as r:
            r.ingest([_three_docs(tmp_path)], "three")
            assert r.store.info("three").analysis == "english-snowball-1"
            # "glaze" meets "glazes" only through the stemmer; "what is the" is not a vote
            for mode in ("bm25", "hybrid", "dense"):
                assert _ranked(r, "what colour is the glaze", mode)[0] == "teapots", mode
            assert _ranked(r, "glazing teapots", "bm25") == ["teapots"]
            # a query of stop words only: BM25 finds nothing, hybrid follows dense
            assert _ranked(r, "what is the", "bm25") == []
            assert _ranked(r, "what is the", "hybrid") == _ranked(r, "what is the", "dense")
            # identifiers stay exact: E100 is not E1000
            assert _ranked(r, "warranty of the E100", "bm25")[0] == "code"
            assert _ranked(r, "warranty of the E100", "hybrid")[0] == "code"
            assert _ranked(r, "warranty of the E1000", "hybrid")[0] == "codes"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def test_a_collection_keeps_the_analysis_it_was_built_with(tmp_path: Path) -> None:
    from loraplex.config import load_settings
    from loraplex.retrieval.retriever import Retriever

    raw = load_settings(overrides=[f"home={tmp_path}", "retrieval.language=none"])
    with Retriever(raw) as r:
        r.ingest([_three_docs(tmp_path)], "raw")
        assert r.store.info("raw").analysis == "none"
    # the default changed back to English: the collection is still queried unanalysed
    with Retriever(load_settings(overrides=[f"home={tmp_path}"])) as r:
        assert r.store.info("raw").analysis == "none"
        assert _ranked(r, "glazes", "bm25", "raw") == ["teapots"]  # the exact word
        assert _ranked(r, "glaze", "bm25", "raw") == []  # no stemming here
        r.ingest([tmp_path / "three"], "stemmed")
        assert _ranked(r, "glaze", "bm25", "stemmed") == ["teapots"]


def test_an_ingest_interrupted_before_its_delete_is_repaired_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between writing a document's new chunks and deleting its old ones, an
    ingest leaves both; the next ingest finds every stored row of the document by a
    query on doc_id and leaves exactly the current chunks, and nothing old is found."""
    from loraplex.config import load_settings
    from loraplex.retrieval.retriever import Retriever
    from loraplex.retrieval.store import KnowledgeStore

    docs = tmp_path / "docs"
    docs.mkdir()
    old = "# Kettle\n\nThe Brava kettle boils in three minutes.\n\n" + "Old filler. " * 200
    new = "# Kettle\n\nThe Brava kettle now boils in ninety seconds.\n"
    (docs / "kettle.md").write_text(old)
    settings = load_settings(overrides=[f"home={tmp_path / 'home'}"])

    def stored(r: Retriever) -> set[str]:
        return set(r.store.existing("crash", ["kettle"]).get("kettle", {}))

    with Retriever(settings) as r:
        r.ingest([docs], "crash")
        before = stored(r)
        assert len(before) > 1
        (docs / "kettle.md").write_text(new)

        def killed(*_: object) -> None:
            raise KeyboardInterrupt  # the process dies here: upserted, nothing deleted

        monkeypatch.setattr(KnowledgeStore, "delete_ids", killed)
        with pytest.raises(KeyboardInterrupt):
            r.ingest([docs], "crash")
        monkeypatch.undo()
        assert stored(r) > before  # the old rows and the new one, side by side
        summary = r.ingest([docs], "crash")
        assert summary.unchanged == 1 and summary.added == 0
        after = stored(r)
        assert len(after) == 1 and not after & before
        texts = [h.text for h in r.search(_request("three minutes", "crash"))]
        assert texts and all("three minutes" not in t for t in texts)
        assert r.delete(["kettle"], "crash") == 1
        assert stored(r) == set()


def _request(query: str, collection: str):
    from loraplex.retrieval.retriever import SearchRequest

    return SearchRequest(query=query, collection=collection, mode="hybrid", top_k=5)


def test_links_are_not_followed_out_of_the_folder(capsys, home: Path, tmp_path: Path) -> None:
    """A link to a file outside the ingested folder is passed over with its reason, a
    link back to the folder itself (a loop) ends nothing, a link inside is read."""
    outside = tmp_path / "outside.md"
    outside.write_text("# Private\n\nThe payroll password is hunter2.\n")
    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThe Velo bike has 21 gears.\n")
    (folder / "leak.md").symlink_to(outside)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "alias.md").symlink_to(folder / "good.md")
    code, out, err = cli(capsys, home, "ingest", str(folder), "-c", "links", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["documents"] == 2  # good and its alias inside the folder
    reasons = {Path(p).name: r for p, r in s["skipped"]}
    assert reasons == {"leak.md": "a link to outside the folder (not followed)"}
    code, out, _ = cli(capsys, home, "search", "payroll password", "-c", "links", "--json")
    assert code == 0 and "hunter2" not in out


def test_tenants_nested_ids_and_milvus_rrf_through_the_cli(capsys, tmp_path: Path) -> None:
    """Doc ids are paths inside the folder; a tenant's chunks are found only under its
    tenant and carry /<tenant>/ ids; fusion=rrf (Milvus hybrid_search) ranks them too."""
    home, docs = tmp_path / "home", tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "setup.md").write_text("# Setup\n\nPlug the Velo charger in first.\n")
    (docs / "faq.md").write_text("# FAQ\n\nThe Orbin lamp uses a 40 watt bulb.\n")
    code, _, err = cli(capsys, home, "ingest", str(docs), "-c", "t", "--tenant", "team-a")
    assert code == 0, err
    ids = collection_ids(home, "t")
    assert {i.split("#")[0] for i in ids} == {"/team-a/guide/setup", "/team-a/faq"}
    for tenant, expected in (("team-a", ["guide/setup", "faq"]), ("default", [])):
        for fusion in ("weighted_rrf", "rrf"):
            code, out, err = cli(
                capsys,
                home,
                "-s",
                f"retrieval.fusion={fusion}",
                "search",
                "Velo charger",
                "-c",
                "t",
                "--tenant",
                tenant,
                "--json",
            )
            assert code == 0, err
            assert [h["doc_id"] for h in json.loads(out)] == expected, (tenant, fusion)
    code, out, _ = cli(
        capsys, home, "ingest", "--delete", "guide/setup", "-c", "t", "--tenant", "team-a"
    )
    assert code == 0 and "1 chunks removed" in out
    assert {i.split("#")[0] for i in collection_ids(home, "t")} == {"/team-a/faq"}
