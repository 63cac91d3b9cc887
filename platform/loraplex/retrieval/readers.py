"""Reading files into documents for ingestion.

Owns: finding files under the paths a user names, telling the supported formats apart
(markdown, plain text, HTML, PDF, JSONL including BEIR ``corpus.jsonl``), turning each
into :class:`IngestDocument` s (a stable doc id, a title, text whose structure survives
as markdown headings and blank-line paragraphs), and refusing what cannot be read with
a one-line reason (binary or garbage, empty, too large, too many pages, too slow to
read, encrypted or unreadable PDF, malformed or too deeply nested JSONL), within the
per-file :class:`FileLimits`. Does not own: chunking (``chunking``) or storage
(``store``).

Doc ids: a file's path relative to the folder it was found under (or its name when
named directly), without the extension, so ``docs/guide/setup.md`` ingested as
``docs`` is ``guide/setup``; a JSONL line brings its own id (``_id``, ``id`` or
``doc_id``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.errors import InputError

SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
}


class Unreadable(Exception):
    """A file that cannot be ingested; the message is the reason, in words."""


@dataclass(frozen=True)
class IngestDocument:
    doc_id: str
    title: str
    text: str
    source: str  # the file it came from, relative to what was ingested (never absolute)
    fmt: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FoundFile:
    path: Path
    root: Path | None  # the folder it was found under, None when named directly

    @property
    def named(self) -> bool:
        return self.root is None

    def doc_id(self) -> str:
        rel = self.path.relative_to(self.root) if self.root else Path(self.path.name)
        return rel.with_suffix("").as_posix()

    def label(self) -> str:
        """Where the file came from, as clients may see it: relative to the folder that
        was ingested (``docs/guide/setup.md``), or the file's name; never absolute."""
        if self.root is None:
            return self.path.name
        return (Path(self.root.name) / self.path.relative_to(self.root)).as_posix()


@dataclass(frozen=True)
class FileLimits:
    """What one file may cost to read (``retrieval.max_file_mb``, ``max_pdf_pages``,
    ``max_file_seconds``)."""

    max_bytes: int = 20 * 2**20
    max_pdf_pages: int = 2000
    max_seconds: float = 60.0

    @classmethod
    def of(cls, settings) -> FileLimits:
        return cls(
            int(settings.max_file_mb * 2**20), settings.max_pdf_pages, settings.max_file_seconds
        )


class _Overtime(BaseException):
    """Raised inside a reader that ran past its time (a BaseException, so that no
    library's ``except Exception`` swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float, deadline: list[float]) -> Iterator[None]:
    """Bound a read: a real-time alarm interrupts pure-Python parsing where the main
    thread reads (the CLI, a job); elsewhere the readers check ``deadline`` between
    pages and lines."""
    deadline.append(time.monotonic() + seconds)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def overtime(*_: object) -> None:
        raise _Overtime

    previous = signal.signal(signal.SIGALRM, overtime)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_time(deadline: list[float]) -> None:
    if deadline and time.monotonic() > deadline[0]:
        raise _Overtime


def find_files(paths: Iterable[str | Path]) -> tuple[list[FoundFile], list[tuple[Path, str]]]:
    """Files to read, and (path, reason) for what was passed over in folders.

    A path that does not exist is an :class:`InputError`; a file named directly with
    an unsupported suffix too; inside folders such files are passed over with a reason.
    Hidden files and folders (``.git``) are skipped silently.
    """
    found: list[FoundFile] = []
    passed: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InputError(f"{raw}: no such file or folder")
        if p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise InputError(
                    f"{raw}: unsupported file type {p.suffix or '(none)'}; use {_kinds()}"
                )
            found.append(FoundFile(p, None))
            continue
        root = p.resolve()
        for f in sorted(p.rglob("*")):  # rglob does not descend into linked folders
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if f.is_symlink():
                target = f.resolve()
                if not target.is_relative_to(root):
                    passed.append((f, "a link to outside the folder (not followed)"))
                    continue
                if not target.is_file():
                    continue  # a link to a folder inside: its files are found there
            elif not f.is_file():
                continue
            if f.suffix.lower() in SUFFIXES:
                found.append(FoundFile(f, p))
            else:
                passed.append((f, f"unsupported file type {f.suffix or '(none)'}"))
    return found, passed


def _kinds() -> str:
    return ", ".join(sorted(SUFFIXES))


def read_file(found: FoundFile, limits: FileLimits) -> list[IngestDocument]:
    """The documents in one file, or :class:`Unreadable` with the reason."""
    path = found.path
    try:
        size = path.stat().st_size
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror}") from None
    if size == 0:
        raise Unreadable("empty file")
    if size > limits.max_bytes:
        raise Unreadable(
            f"{size / 2**20:.1f} MiB is over the {limits.max_bytes / 2**20:.1f} MiB limit "
            "(retrieval.max_file_mb)"
        )
    deadline: list[float] = []
    try:
        with _time_limit(limits.max_seconds, deadline):
            docs = _read(found, limits, deadline)
    except _Overtime:
        raise Unreadable(
            f"took over {limits.max_seconds:g} s to read (retrieval.max_file_seconds)"
        ) from None
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise Unreadable("no text in it")
    return docs


def _read(found: FoundFile, limits: FileLimits, deadline: list[float]) -> list[IngestDocument]:
    path = found.path
    fmt = SUFFIXES[path.suffix.lower()]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror}") from None
    if fmt == "pdf":
        text, title = _pdf_text(data, limits.max_pdf_pages, deadline)
        return [IngestDocument(found.doc_id(), title or path.stem, text, found.label(), fmt)]
    if fmt == "jsonl":
        return list(_jsonl_documents(_decode(data), found.label(), deadline))
    text = _decode(data)
    if fmt == "html":
        text, title = _html_text(text)
    else:
        title = _markdown_title(text) if fmt == "markdown" else ""
    return [IngestDocument(found.doc_id(), title or path.stem, text, found.label(), fmt)]


def _decode(data: bytes) -> str:
    """UTF-8 text, or Unreadable for binary data and other encodings."""
    if b"\x00" in data[:8192]:
        raise Unreadable("binary file (not text)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text[:8192])
    if printable < 0.9 * min(len(text), 8192):
        raise Unreadable("garbage: mostly control characters")
    return text


def _markdown_title(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return ""


def _html_text(html: str) -> tuple[str, str]:
    """HTML to markdown-ish text: headings become ``#`` lines, blocks become paragraphs."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "nav", "footer"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    blocks: list[str] = []
    body = soup.body or soup
    for el in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "th"]):
        if el.find_parent(["p", "li", "pre", "td", "th"]):
            continue  # nested blocks are read with their parent
        words = el.get_text(" ", strip=True)
        if not words:
            continue
        if el.name and el.name[0] == "h" and el.name[1:].isdigit():
            blocks.append("#" * int(el.name[1:]) + " " + words)
        elif el.name == "li":
            blocks.append("- " + words)
        else:
            blocks.append(words)
    if not blocks:  # text outside block elements
        blocks = [body.get_text(" ", strip=True)]
    if not title:
        title = next((b.lstrip("# ") for b in blocks if b.startswith("#")), "")
    return "\n\n".join(blocks), title


def _pdf_text(data: bytes, max_pages: int, deadline: list[float]) -> tuple[str, str]:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PdfReadError, PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Unreadable("encrypted PDF (decrypt it first)")
        if len(reader.pages) > max_pages:
            raise Unreadable(
                f"{len(reader.pages)} pages is over the {max_pages}-page limit "
                "(retrieval.max_pdf_pages)"
            )
        pages = []
        for page in reader.pages:
            _check_time(deadline)
            pages.append((page.extract_text() or "").strip())
        meta = reader.metadata
        title = str(meta.title).strip() if meta and meta.title else ""
    except Unreadable:
        raise
    except LimitReachedError:
        raise Unreadable("PDF expands beyond pypdf's limits (a decompression bomb?)") from None
    except RecursionError:
        raise Unreadable("PDF objects nest too deeply") from None
    except (PdfReadError, PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise Unreadable(f"unreadable PDF ({type(e).__name__}: {str(e)[:80]})") from None
    text = "\n\n".join(p for p in pages if p)
    if not text:
        raise Unreadable("PDF has no extractable text (scanned images need OCR first)")
    return text, title


def _jsonl_documents(text: str, source: str, deadline: list[float]) -> Iterator[IngestDocument]:
    """One document per line: BEIR ``{"_id", "title", "text"}`` or ``id``/``doc_id``."""
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if n % 256 == 0:
            _check_time(deadline)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise Unreadable(f"line {n}: not JSON ({e.msg})") from None
        except RecursionError:
            raise Unreadable(f"line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise Unreadable(f"line {n}: expected a JSON object")
        doc_id = next((row[k] for k in ("_id", "id", "doc_id") if k in row), None)
        body = row.get("text", row.get("content"))
        if not isinstance(doc_id, str | int) or str(doc_id) == "":
            raise Unreadable(f"line {n}: no document id (_id, id or doc_id)")
        if not isinstance(body, str):
            raise Unreadable(f"line {n}: no text (a string field 'text' or 'content')")
        doc_id = str(doc_id)
        if doc_id.startswith("/") or len(doc_id) > 512:
            raise Unreadable(f"line {n}: a document id cannot start with '/' or be over 512 chars")
        if doc_id in seen:
            raise Unreadable(f"line {n}: document id {doc_id!r} appears twice")
        seen.add(doc_id)
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        yield IngestDocument(
            doc_id,
            str(row.get("title") or ""),
            body,
            source,
            "jsonl",
            {str(k): str(v) for k, v in meta.items()},
        )
