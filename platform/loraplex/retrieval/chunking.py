"""Splitting documents into chunks that respect their structure.

Owns: :func:`chunk_document`: a document is cut into sections at markdown headings,
sections into paragraphs (blank lines), and paragraphs are packed into chunks of at
most ``size`` characters; a chunk never spans two sections, and neighbours within a
section share up to ``overlap`` characters (whole trailing paragraphs, or the tail of a
long paragraph cut at a sentence or word boundary). Each chunk is an exact slice of
the document (its character offsets are true) and carries its heading path and a
stable id made from the document id, its position and a hash of its content.
Does not own: reading files (``readers``) or embeddings (``embeddings``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_BREAK = re.compile(r"\n[ \t]*\n")  # linear: no nested quantifiers


def heading(line: str) -> tuple[int, str] | None:
    """(level, title) of a Markdown ATX heading line (``## Setup ##``), else None.

    Parsed by hand, in linear time: the regular expression it replaces backtracked
    cubically on a line such as ``# a`` + 10,000 spaces + ``b``."""
    if not line.startswith("#"):
        return None
    level = len(line) - len(line.lstrip("#"))
    rest = line[level:]
    if level > 6 or not rest or rest[0] not in " \t":
        return None
    body = rest.strip()
    if not body or "\n" in body or "\r" in body:
        return None
    title = body.rstrip("#").rstrip() or body  # closing hashes are decoration
    return level, title


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    doc_id: str
    position: int
    text: str
    start: int  # character offsets into the document text
    end: int
    heading: str  # "Title > Section > Subsection"
    content_hash: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_chunk_id(doc_id: str, position: int, digest: str) -> str:
    return f"{doc_id}#{position:05d}-{digest[:12]}"


def _blocks(text: str) -> list[tuple[int, int, int, str]]:
    """(start, end, heading level or 0, heading text) for each non-empty block."""
    out = []
    pos = 0
    for m in [*_BREAK.finditer(text), None]:
        end = m.start() if m else len(text)
        segment = text[pos:end]
        # A heading line followed directly by text is its own block.
        offset = pos
        for piece in _split_headings(segment):
            s = offset + (len(piece) - len(piece.lstrip()))
            e = offset + len(piece.rstrip())
            offset += len(piece)
            if e > s:
                h = heading(text[s:e])
                out.append((s, e, h[0] if h else 0, h[1] if h else ""))
        pos = m.end() if m else len(text)
    return out


def _split_headings(segment: str) -> list[str]:
    lines = segment.splitlines(keepends=True)
    pieces: list[str] = []
    cur = ""
    for line in lines:
        if line.lstrip() == line and heading(line.strip()):
            if cur:
                pieces.append(cur)
            pieces.append(line)
            cur = ""
        else:
            cur += line
    if cur:
        pieces.append(cur)
    return pieces


def _cut_long(text: str, start: int, end: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows over one long block, cut at sentence ends, else spaces, else anywhere."""
    spans = []
    s = start
    while s < end:
        e = min(end, s + size)
        if e < end:
            window = text[s:e]
            cut = max(
                window.rfind(". "), window.rfind("\n"), window.rfind("? "), window.rfind("! ")
            )
            if cut < size // 2:
                cut = window.rfind(" ")
            if cut >= size // 2:
                e = s + cut + 1
        spans.append((s, e))
        if e >= end:
            break
        nxt = max(e - overlap, s + 1)
        if overlap:  # begin the overlap at a word boundary
            space = text.find(" ", nxt, e)
            nxt = space + 1 if space != -1 else nxt
        while nxt < end and text[nxt].isspace():
            nxt += 1
        s = nxt
    return spans


def chunk_document(
    doc_id: str, text: str, title: str = "", size: int = 1000, overlap: int = 150
) -> list[Chunk]:
    """The chunks of one document, in order."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    sections: list[tuple[str, list[tuple[int, int]]]] = []
    path: list[tuple[int, str]] = []
    current: list[tuple[int, int]] = []

    def heading_path() -> str:
        names = [title] if title else []
        names += [h for _, h in path if h != title]
        return " > ".join(names)

    for s, e, level, name in _blocks(text):
        if level:
            if current:
                sections.append((heading_path(), current))
                current = []
            path = [p for p in path if p[0] < level] + [(level, name)]
        current.append((s, e))
    if current:
        sections.append((heading_path(), current))

    spans: list[tuple[str, int, int]] = []
    for heading, blocks in sections:
        pieces: list[tuple[int, int]] = []
        for s, e in blocks:
            pieces += _cut_long(text, s, e, size, overlap) if e - s > size else [(s, e)]
        i = 0
        while i < len(pieces):
            start, end = pieces[i]
            j = i + 1
            while j < len(pieces) and pieces[j][1] - start <= size:
                end = pieces[j][1]
                j += 1
            spans.append((heading, start, end))
            if j >= len(pieces):
                break
            # Overlap: begin the next chunk with trailing pieces that fit in `overlap`.
            k = j
            while k - 1 > i and end - pieces[k - 1][0] <= overlap:
                k -= 1
            # ...only if the next piece still fits beside them, so every chunk adds text.
            i = k if pieces[j][1] - pieces[k][0] <= size else j
    chunks = []
    for position, (heading, s, e) in enumerate(spans):
        body = text[s:e]
        digest = content_hash(body)
        chunks.append(
            Chunk(
                make_chunk_id(doc_id, position, digest),
                doc_id,
                position,
                body,
                s,
                e,
                heading,
                digest,
            )
        )
    return chunks
