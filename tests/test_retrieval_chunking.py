"""Chunking: exact offsets, heading paths, size and overlap bounds, stable ids."""

from __future__ import annotations

import itertools

from loraplex.retrieval.chunking import chunk_document

DOC = (
    "# Guide\n\nIntro paragraph about the product.\n\n"
    "## Setup\n\nStep one: plug it in.\n\nStep two: press the button.\n\n"
    + "A long sentence about setup that keeps going. " * 60
    + "\n\n## Troubleshooting\n\nRestart it.\n"
)


def test_chunks_are_exact_slices_within_size_and_never_span_sections() -> None:
    chunks = chunk_document("guide", DOC, "Guide", size=300, overlap=60)
    assert len(chunks) > 5
    for c in chunks:
        assert DOC[c.start : c.end] == c.text
        assert 0 < len(c.text) <= 300
        # a chunk never crosses into the next section: a heading only ever opens it
        later = c.text.splitlines()[1:]
        assert not any(line.startswith("#") for line in later), c.text
    headings = [c.heading for c in chunks]
    assert headings[0] == "Guide"
    assert "Guide > Setup" in headings
    assert headings[-1] == "Guide > Troubleshooting"
    assert [c.position for c in chunks] == list(range(len(chunks)))


def test_neighbours_in_a_long_paragraph_overlap_and_cover_it() -> None:
    chunks = [c for c in chunk_document("g", DOC, "Guide", 300, 60) if "long sentence" in c.text]
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end, "neighbours share text"
        assert a.end - b.start <= 60
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    long_start = DOC.index("A long sentence")
    long_end = DOC.index("\n\n## Troubleshooting")
    assert set(range(long_start, long_end)) - covered <= {
        i for i in range(long_start, long_end) if DOC[i].isspace()
    }


def test_ids_are_stable_and_change_only_where_the_text_changes() -> None:
    a = chunk_document("guide", DOC, "Guide", 300, 60)
    b = chunk_document("guide", DOC, "Guide", 300, 60)
    assert [c.chunk_id for c in a] == [c.chunk_id for c in b]
    edited = DOC.replace("Restart it.", "Unplug it, then restart it.")
    c = chunk_document("guide", edited, "Guide", 300, 60)
    changed = [x.position for x, y in zip(a, c, strict=True) if x.chunk_id != y.chunk_id]
    assert changed == [len(a) - 1]
    assert all(x.chunk_id.startswith("guide#") for x in a)


def test_hostile_lines_are_chunked_in_linear_time() -> None:
    """Lines built to make a regular expression backtrack (100k characters of spaces,
    ``#`` and mixed whitespace) go through chunking without hanging: an alarm fails the
    test instead of letting a cubic pattern run for hours."""
    import signal

    from loraplex.retrieval.chunking import heading

    assert heading("## Setup ##") == (2, "Setup") and heading("# C#") == (1, "C")
    assert heading("####### seven") is None and heading("#nospace") is None
    n = 100_000
    hostile = [
        "# a" + " " * n + "b",
        "#" * n,
        "# " + "#" * n + " x",
        "# " + " \t" * (n // 2) + "#",
        "\n".join(["# " + " " * 1000 + "x"] * 100),
        " \t\n" * (n // 3),
    ]

    def too_slow(*_: object) -> None:
        raise TimeoutError("chunking a hostile line did not finish within 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        for text in hostile:
            chunks = chunk_document("hostile", text, "Hostile", size=1000, overlap=100)
            assert all(text[c.start : c.end] == c.text for c in chunks)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
