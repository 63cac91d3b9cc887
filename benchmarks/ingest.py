"""Benchmark of ingestion's memory and write path (issue: nothing lost, nothing duplicated).

Measures, on this machine:
1. peak memory of an ingest at each scale (default 10,000 and 100,000 chunks), each in
   its own process, against a Milvus server in another process (Milvus Lite's server
   mode), so the figure is the ingest pipeline's and not the database's: streaming
   (the default batches of ``retrieval.ingest.BATCH_CHUNKS``) and, for comparison, one
   batch holding every chunk (what ingest did before it streamed); chunks/s of the
   write path (read, chunk, compare, upsert, delete, flush) into a new collection, and
   the time of a second ingest of the same files (every batch compared with what is
   stored, nothing written). The texts are real: the
   Python sources of the installed packages (docstrings and code, copied as ``.txt``);
   the vectors are cheap stand-ins (seeded random unit vectors), as in
   ``benchmarks/retrieval.py``'s 100k row, because MiniLM on 2 cores makes ~60
   chunks/s and would take half an hour at 100k;
2. the worst-case chunking input: 100,000-character hostile lines (spaces, ``#``,
   mixed whitespace) through the heading parser and chunker, the slowest of them.

Usage: .venv/bin/python benchmarks/ingest.py [--scales 10000 100000]
Prints markdown tables to paste into benchmarks/RESULTS.md and writes ingest.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CHARS_PER_CHUNK = 660  # source files chunk at blank lines: ~660 characters a chunk


def build_corpus(folder: Path, chunks: int) -> int:
    """Copy installed Python sources as text until about ``chunks`` chunks; chars."""
    folder.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    total = 0
    for n, src in enumerate(sorted(site.rglob("*.py"))):
        try:
            text = src.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 2000 or "\x00" in text:
            continue
        (folder / f"{n:06d}-{src.stem}.txt").write_text(text)
        total += len(text)
        if total >= chunks * CHARS_PER_CHUNK:
            break
    return total


def child(folder: str, uri: str, batch: int) -> None:
    """One ingest in this process; prints its figures as JSON."""
    import numpy as np

    from loraplex.config import load_settings
    from loraplex.retrieval import ingest
    from loraplex.retrieval.store import KnowledgeStore

    ingest.BATCH_CHUNKS = batch or ingest.BATCH_CHUNKS
    rng = np.random.default_rng(0)

    def embed(texts: list[str]) -> list[list[float]]:
        v = rng.standard_normal((len(texts), 384)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.tolist()

    home = Path(folder).parent / "home"
    settings = load_settings(overrides=[f"home={home}", f"milvus.uri={uri}"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = f"bench_{batch}_{int(time.time())}"
    with KnowledgeStore.open(settings.milvus, settings.retrieval) as store:
        start = time.perf_counter()
        summary = ingest.ingest([folder], name, store, embed, ("stand-in", 384), settings.retrieval)
        seconds = time.perf_counter() - start
        start = time.perf_counter()  # again: every batch compared with what is stored
        again = ingest.ingest([folder], name, store, embed, ("stand-in", 384), settings.retrieval)
        again_s = time.perf_counter() - start
        assert again.unchanged == summary.added, again
        store.drop(name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "chunks": summary.added,
                "files": summary.files,
                "seconds": seconds,
                "chunks_per_s": summary.added / seconds,
                "reingest_unchanged_s": again_s,
                "peak_rss_gib": peak,
                "rss_before_ingest_gib": base,
            }
        )
    )


def run_child(folder: Path, uri: str, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), uri, str(batch)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"ingest child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def hostile_chunking() -> dict:
    from loraplex.retrieval.chunking import chunk_document

    n = 100_000
    hostile = {
        "'# a' + 100k spaces + 'b'": "# a" + " " * n + "b",
        "100k '#'": "#" * n,
        "'# ' + 100k '#' + ' x'": "# " + "#" * n + " x",
        "'# ' + 100k of ' \\t' + '#'": "# " + " \t" * (n // 2) + "#",
        "100 lines of '# ' + 1000 spaces + 'x'": "\n".join(["# " + " " * 1000 + "x"] * 100),
        "100k of ' \\t\\n'": " \t\n" * (n // 3),
    }
    out = {}
    for label, text in hostile.items():
        start = time.perf_counter()
        chunk_document("hostile", text, "Hostile", size=1000, overlap=100)
        out[label] = time.perf_counter() - start
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="*", default=[10_000, 100_000])
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import free_port, start_milvus_server, stop

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    port = free_port()
    server = start_milvus_server(tmp / "server", port)
    uri = f"http://127.0.0.1:{port}"
    results: dict = {"date": time.strftime("%Y-%m-%d"), "scales": {}}
    try:
        for n in args.scales:
            folder = tmp / f"corpus-{n}" / "docs"
            chars = build_corpus(folder, n)
            print(f"{n}: corpus of {chars / 1e6:.1f} M characters", flush=True)
            row = {
                "characters": chars,
                "streaming": run_child(folder, uri, 0),
                "one_batch": run_child(folder, uri, 10**9),
            }
            results["scales"][str(n)] = row
            print(n, json.dumps(row, indent=2), flush=True)
    finally:
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
    results["hostile_chunking_s"] = hostile_chunking()
    Path(__file__).with_name("ingest.json").write_text(json.dumps(results, indent=2))
    print("\n| measure | " + " | ".join(f"{int(n):,} chunks" for n in results["scales"]) + " |")
    print("|---" * (1 + len(results["scales"])) + "|")
    for key, label in (("streaming", "streaming"), ("one_batch", "one batch of everything")):
        cells = [
            f"{r[key]['peak_rss_gib']:.2f} GiB, {r[key]['chunks_per_s']:,.0f} chunks/s "
            f"({r[key]['chunks']:,} chunks)"
            for r in results["scales"].values()
        ]
        print(f"| {label}: peak RSS, write path | " + " | ".join(cells) + " |")
    cells = [f"{r['streaming']['reingest_unchanged_s']:.1f} s" for r in results["scales"].values()]
    print("| the same files again (all unchanged) | " + " | ".join(cells) + " |")
    print("\n| hostile line (100k characters) | chunking time |\n|---|---|")
    for label, s in results["hostile_chunking_s"].items():
        print(f"| {label} | {s * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
