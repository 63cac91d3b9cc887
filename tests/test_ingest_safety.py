"""Ingestion that loses nothing and duplicates nothing, against real Milvus Lite and a
real Milvus gRPC server: an ingest SIGKILLed at several points of its write path and
run again leaves exactly the current chunks; two ingests of one collection on a server
exclude each other (a lease in Milvus), of two collections both run; hostile files are
skipped with their reason within the per-file limits while the good ones land."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import LORAPLEX, REPO, clean_env, free_port, start_milvus_server, stop

CHUNK = "retrieval.chunk_size=200"

# A subprocess that runs `loraplex ingest` with batches of ~2 chunks and SIGKILLs itself
# at the N-th call (0-based) of one write step: a real kill at a real point of the path.
KILLER = """
import os, signal, sys
from loraplex.retrieval import ingest, store
ingest.BATCH_CHUNKS = 2
point, n = sys.argv[1], int(sys.argv[2])
calls = {"upsert": 0, "delete_ids": 0, "flush": 0}
def wrap(name):
    orig = getattr(store.KnowledgeStore, name)
    def step(self, *args, **kwargs):
        if name == point and calls[name] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[name] += 1
        return orig(self, *args, **kwargs)
    return step
for name in calls:
    setattr(store.KnowledgeStore, name, wrap(name))
from loraplex.cli.main import main
main(sys.argv[3:])
"""


HOLDER = """
import sys
from loraplex.config import load_settings
from loraplex.retrieval.locks import IngestLock
from loraplex.retrieval.store import KnowledgeStore
settings = load_settings(overrides=[f"home={sys.argv[1]}", sys.argv[2]])
with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
    with IngestLock(store, "kb", ttl_s=float(sys.argv[3]), settle_s=0.2) as lock:
        print(lock.holder, flush=True)
        sys.stdin.read()
"""


RACER = """
import sys, time
from loraplex.config import load_settings
from loraplex.retrieval.locks import IngestLock
from loraplex.retrieval.store import KnowledgeStore
settings = load_settings(overrides=[f"home={sys.argv[1]}", sys.argv[2]])
with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
    with IngestLock(store, "race", wait_s=120, settle_s=0.3):
        entered = time.time()
        time.sleep(0.5)
        left = time.time()
print(entered, left)
"""


def _sentences(tag: str, n: int) -> str:
    return " ".join(f"The {tag} fact number {i} is kept in line {i}." for i in range(n))


def write_corpus(folder: Path, version: int) -> None:
    """Version 1, then version 2: a changed document, one that shrank, one removed from
    its middle, one unchanged, one new."""
    folder.mkdir(exist_ok=True)
    if version == 1:
        docs = {
            "kettle": "# Kettle\n\n" + _sentences("oldkettle", 12),
            "lamp": "# Lamp\n\n" + _sentences("lamp", 10),
            "bike": "# Bike\n\n" + _sentences("oldbike", 14),
            "stove": "# Stove\n\n" + _sentences("stove", 6),
        }
    else:
        docs = {
            "kettle": "# Kettle\n\n" + _sentences("newkettle", 12),
            "lamp": "# Lamp\n\n" + _sentences("lamp", 10),  # unchanged
            "bike": "# Bike\n\n" + _sentences("oldbike", 3),  # shrank
            "stove": "# Stove\n\n" + _sentences("stove", 6) + "\n\n" + _sentences("gas", 4),
            "fridge": "# Fridge\n\n" + _sentences("fridge", 5),  # new
        }
        (folder / "bike.md").unlink(missing_ok=True)
    for name, text in docs.items():
        (folder / f"{name}.md").write_text(text + "\n")


def rows(home: Path, collection: str, *overrides: str) -> dict[str, str]:
    """chunk id -> content hash, read straight from Milvus."""
    from loraplex.config import load_settings
    from loraplex.retrieval.store import KnowledgeStore

    settings = load_settings(overrides=[f"home={home}", *overrides])
    with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
        if collection not in store.collections():
            return {}
        store.info(collection)
        got = store.client.query(
            collection, filter='doc_id != ""', output_fields=["content_hash"], limit=16384
        )
    return {r["id"]: r["content_hash"] for r in got}


def cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> tuple[int, str, str]:
    from loraplex.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["--home", str(home), "-s", CHUNK, *args])
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


@pytest.mark.parametrize(
    "point",
    [
        ("upsert", 1),  # the first batch written, the second not
        ("delete_ids", 0),  # a batch's new rows written, its old rows not yet removed
        ("delete_ids", 2),  # two batches complete, the rest untouched
        ("flush", 0),  # everything written, nothing sealed
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def test_an_ingest_killed_anywhere_then_run_again_leaves_exactly_the_current_chunks(
    capsys, tmp_path: Path, point: tuple[str, int]
) -> None:
    home, docs = tmp_path / "home", tmp_path / "docs"
    write_corpus(docs, 1)
    assert cli(capsys, home, "ingest", str(docs), "-c", "kb")[0] == 0
    old = rows(home, "kb")
    write_corpus(docs, 2)
    assert cli(capsys, home, "ingest", str(docs), "-c", "clean")[0] == 0
    expected = rows(home, "clean")
    assert expected and expected != old

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            *map(str, point),
            "--home",
            str(home),
            "-s",
            CHUNK,
            "ingest",
            str(docs),
            "-c",
            "kb",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # killed, every document is still whole: its old rows all there, or its new ones
    left = rows(home, "kb")
    for doc in ("kettle", "lamp", "bike", "stove"):
        mine = {k for k in left if k.startswith(f"{doc}#")}
        was = {k for k in old if k.startswith(f"{doc}#")}
        now = {k for k in expected if k.startswith(f"{doc}#")}
        assert mine >= was or mine >= now, (doc, point)

    code, out, err = cli(capsys, home, "ingest", str(docs), "-c", "kb", "--json")
    assert code == 0, err
    assert rows(home, "kb") == expected  # nothing lost, nothing duplicated, nothing stale
    code, out, _ = cli(capsys, home, "search", "oldkettle", "-c", "kb", "--mode", "bm25", "--json")
    assert code == 0 and json.loads(out) == []
    # and once more: nothing left to do
    code, out, _ = cli(capsys, home, "ingest", str(docs), "-c", "kb", "--json")
    summary = json.loads(out)
    assert (summary["added"], summary["updated"], summary["removed"]) == (0, 0, 0)
    assert summary["unchanged"] == len(expected)
    code, out, _ = cli(capsys, home, "ingest", "--delete", "kettle", "-c", "kb")
    assert code == 0
    assert rows(home, "kb") == {k: v for k, v in expected.items() if not k.startswith("kettle#")}


def test_ingest_streams_in_batches_and_reports_the_same_summary(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batches of 2 chunks the corpus goes through in several write rounds, and the
    summary and stored rows are those of one round."""
    from loraplex.retrieval import ingest
    from loraplex.retrieval.store import KnowledgeStore

    docs = tmp_path / "docs"
    write_corpus(docs, 1)
    assert cli(capsys, tmp_path / "one", "ingest", str(docs), "-c", "kb")[0] == 0
    one = rows(tmp_path / "one", "kb")
    rounds = []
    real = KnowledgeStore.upsert
    monkeypatch.setattr(ingest, "BATCH_CHUNKS", 2)
    monkeypatch.setattr(
        KnowledgeStore,
        "upsert",
        lambda self, *a, **k: rounds.append({r["doc_id"] for r in a[1]}) or real(self, *a, **k),
    )
    code, out, err = cli(capsys, tmp_path / "many", "ingest", str(docs), "-c", "kb", "--json")
    assert code == 0, err
    assert len(rounds) == 4 and all(len(r) == 1 for r in rounds)  # one document per round
    assert rows(tmp_path / "many", "kb") == one
    assert json.loads(out)["added"] == len(one) and json.loads(out)["documents"] == 4
    # what is stored is read page by page when a query would bring more than Milvus gives
    from loraplex.retrieval import store

    monkeypatch.setattr(store, "_QUERY_LIMIT", 3)
    monkeypatch.setattr(store, "_POSITIONS", 2)
    write_corpus(docs, 2)
    code, out, err = cli(capsys, tmp_path / "many", "ingest", str(docs), "-c", "kb", "--json")
    assert code == 0, err
    assert cli(capsys, tmp_path / "two", "ingest", str(docs), "-c", "kb")[0] == 0
    assert rows(tmp_path / "many", "kb") == rows(tmp_path / "two", "kb")
    code, out, err = cli(capsys, tmp_path / "many", "ingest", str(docs), "-c", "kb", "--json")
    assert json.loads(out)["unchanged"] == len(rows(tmp_path / "two", "kb"))


def test_two_ingests_of_one_collection_on_a_milvus_server_exclude_each_other(
    capsys, tmp_path: Path
) -> None:
    from loraplex.config import load_settings
    from loraplex.retrieval.locks import LOCKS
    from loraplex.retrieval.store import KnowledgeStore

    port = free_port()
    server = start_milvus_server(tmp_path / "server-data", port)
    home, docs = tmp_path / "home", tmp_path / "docs"
    write_corpus(docs, 1)
    uri = f"milvus.uri=http://127.0.0.1:{port}"
    settings = load_settings(overrides=[f"home={home}", uri])
    try:
        assert cli(capsys, home, "-s", uri, "ingest", str(docs), "-c", "kb")[0] == 0
        before = rows(home, "kb", uri)
        write_corpus(docs, 2)
        # another machine's ingest of "kb" holds the lease: a process that holds it until
        # its stdin closes
        other = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(home), uri, "3"],  # a 3 s lease, renewed
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        try:
            holder = other.stdout.readline().strip()
            assert holder.startswith("pid "), holder
            code, _, err = cli(capsys, home, "-s", uri, "ingest", str(docs), "-c", "kb")
            assert code == 2
            line = err.strip().splitlines()[-1]
            assert line.startswith(
                f"loraplex: error: collection 'kb' is being ingested by {holder}"
            )
            # another collection is not held up; --delete takes the same lock
            assert cli(capsys, home, "-s", uri, "ingest", str(docs), "-c", "other")[0] == 0
            code, _, err = cli(capsys, home, "-s", uri, "ingest", "--delete", "lamp", "-c", "kb")
            assert code == 2 and "is being ingested by" in err
            assert rows(home, "kb", uri) == before  # refused: nothing written
            # the holder renews its 3 s lease while it holds it (every third of the lease)
            with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:

                def expires() -> int:
                    got = store.client.query(
                        LOCKS, filter='id == "kb"', output_fields=["expires_ms"]
                    )
                    return got[0]["expires_ms"]

                first = expires()
                time.sleep(4)  # past the first lease: still held, and later
                assert expires() > first
            # an ingest that may wait waits (neither failing nor writing) and gets in once
            # the holder is done
            waiter = subprocess.Popen(
                [
                    *(LORAPLEX, "--home", str(home), "-s", CHUNK, "-s", uri),
                    *("-s", "retrieval.ingest_lock_wait_s=60"),
                    *("ingest", str(docs), "-c", "kb", "--json"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=clean_env(),
            )
            try:
                time.sleep(8)
                assert waiter.poll() is None, waiter.communicate()
                assert rows(home, "kb", uri) == before
                other.stdin.close()
                out, err = waiter.communicate(timeout=180)
            finally:
                stop(waiter)
            assert waiter.returncode == 0, err
            assert json.loads(out)["added"] > 0 and rows(home, "kb", uri) != before
        finally:
            stop(other)
        with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
            assert LOCKS not in store.collections()  # the locks are not a knowledge base
            assert store.client.query(LOCKS, filter='id != ""', output_fields=["holder"]) == []

        # racing writers on four processes: each gets in, never two at once
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(home), uri],
                stdout=subprocess.PIPE,
                text=True,
                env=clean_env(),
            )
            for _ in range(4)
        ]
        spans = []
        for r in racers:
            out, _ = r.communicate(timeout=180)
            assert r.returncode == 0
            spans.append(tuple(map(float, out.split())))
        spans.sort()
        assert len(spans) == 4
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans

        # a holder killed with SIGKILL stops renewing: its lapsed lease is taken over
        with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
            store.client.upsert(
                LOCKS,
                [
                    {
                        "id": "kb",
                        "token": "dead",
                        "holder": "pid 1 on gone",
                        "expires_ms": 0,
                        "v": [0.0, 0.0],
                    }
                ],
            )
        code, _, err = cli(capsys, home, "-s", uri, "ingest", str(docs), "-c", "kb")
        assert code == 0, err
    finally:
        stop(server)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A folder of files that are not what they claim, too long to read, or oddly named,
    beside one good file."""
    from fpdf import FPDF

    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThe Velo bike has 21 gears.\n")
    (folder / "photo.pdf").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # a JPEG
    (folder / "archive.md").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)  # a zip
    (folder / "page.html").write_bytes(b"%PDF-1.4\n" + bytes(range(128, 256)) * 8)
    (folder / "table.jsonl").write_text("<html><body>not json</body></html>\n")
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for i in range(12):
        pdf.add_page()
        pdf.multi_cell(0, 10, f"Page {i} of the long manual.")
    pdf.output(str(folder / "long.pdf"))
    (folder / 'odd "quoted" name\n.md').write_text("# Odd\n\nThe Zanbel warehouse is open.\n")
    (folder / 'it\'s "quoted".md').write_text("# Quoted\n\nThe Orbin lamp is bright.\n")
    (folder / "ümlaut wörds.txt").write_text("Die Brava Kanne kocht in drei Minuten.\n")
    return folder


def test_hostile_files_are_skipped_with_their_reason_within_the_limits(
    capsys, tmp_path: Path, hostile: Path
) -> None:
    home = tmp_path / "home"
    code, out, err = cli(
        capsys,
        home,
        "-s",
        "retrieval.max_pdf_pages=10",
        "ingest",
        str(hostile),
        "-c",
        "kb",
        "--json",
    )
    assert code == 0, err
    s = json.loads(out)
    reasons = {Path(p).name: r for p, r in s["skipped"]}
    assert reasons == {
        "photo.pdf": reasons["photo.pdf"],
        "archive.md": "binary file (not text)",
        "page.html": reasons["page.html"],
        "table.jsonl": "line 1: not JSON (Expecting value)",
        "long.pdf": "12 pages is over the 10-page limit (retrieval.max_pdf_pages)",
        'odd "quoted" name\n.md': "document id 'odd \"quoted\" name\\n' holds a control "
        "character (rename it)",
    }, reasons
    assert reasons["photo.pdf"].startswith("unreadable PDF")
    assert reasons["page.html"].startswith(("not UTF-8 text", "binary file"))
    assert s["documents"] == 3  # good, the quoted name, the umlaut one
    stored = rows(home, "kb")
    assert {cid.split("#")[0] for cid in stored} == {"good", 'it\'s "quoted"', "ümlaut wörds"}
    code, out, _ = cli(capsys, home, "ingest", "--delete", 'it\'s "quoted"', "-c", "kb")
    assert code == 0 and "1 chunks removed" in out
    # a file that takes too long to read (a big HTML page: the parser is interrupted)
    # is refused with the reason, and nothing is written
    slow = tmp_path / "slow.html"
    slow.write_text(
        "<html><body>" + "<p>The Velo bike <b>rolls</b>.</p>" * 40_000 + "</body></html>"
    )
    before = rows(home, "kb")
    code, out, err = cli(
        capsys, home, "-s", "retrieval.max_file_seconds=0.05", "ingest", str(slow), "-c", "kb"
    )
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith("slow.html: took over 0.05 s to read (retrieval.max_file_seconds)")
    )
    assert rows(home, "kb") == before
