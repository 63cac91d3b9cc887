"""Text analysis for BM25: what the lexical side of retrieval sees of a text.

Owns: :func:`analyze`, one function for documents (at ingest) and queries (at search),
so that both are cut the same way: lower-cased word tokens, English stop words dropped,
every other word stemmed with the Snowball English stemmer ("glazes" -> "glaze"),
and tokens holding a digit (model codes, versions, ids such as ``E100`` or ``v2``) kept
exactly as they are. :data:`ANALYSES` names each analysis; the one a collection was
built with is recorded in its properties and used for its queries, whatever the
default is later. ``none`` keeps text as it is (for code or ids): Milvus's standard
analyzer then splits and lower-cases it, as before this module.

Milvus Lite accepts only the ``standard`` and ``jieba`` tokenizers (an ``english``
analyzer is refused, a ``stemmer`` filter has no effect), so the analysis runs here,
before Milvus, and behaves the same on Lite and on a server. Does not own: the BM25
index or its scoring (Milvus).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

Language = Literal["english", "none"]
# analysis name (recorded per collection) -> the language setting that makes it
ANALYSES: dict[str, Language] = {"english-snowball-1": "english", "none": "none"}
LEGACY = "legacy"  # collections made before analysis was recorded: BM25 on raw text

# Snowball's English stop word list (snowballstem.org/algorithms/english/stop.txt),
# plus the single letters left by splitting "teapot's" or "don't".
STOP_WORDS = frozenset(
    [
        "i",
        "me",
        "my",
        "myself",
        "we",
        "our",
        "ours",
        "ourselves",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "her",
        "hers",
        "herself",
        "it",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "these",
        "those",
        "am",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "would",
        "should",
        "could",
        "ought",
        "i'm",
        "you're",
        "he's",
        "she's",
        "it's",
        "we're",
        "they're",
        "i've",
        "you've",
        "we've",
        "they've",
        "i'd",
        "you'd",
        "he'd",
        "she'd",
        "we'd",
        "they'd",
        "i'll",
        "you'll",
        "he'll",
        "she'll",
        "we'll",
        "they'll",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "hasn't",
        "haven't",
        "hadn't",
        "doesn't",
        "don't",
        "didn't",
        "won't",
        "wouldn't",
        "shan't",
        "shouldn't",
        "can't",
        "cannot",
        "couldn't",
        "mustn't",
        "let's",
        "that's",
        "who's",
        "what's",
        "here's",
        "there's",
        "when's",
        "where's",
        "why's",
        "how's",
        "a",
        "an",
        "the",
        "and",
        "but",
        "if",
        "or",
        "because",
        "as",
        "until",
        "while",
        "of",
        "at",
        "by",
        "for",
        "with",
        "about",
        "against",
        "between",
        "into",
        "through",
        "during",
        "before",
        "after",
        "above",
        "below",
        "to",
        "from",
        "up",
        "down",
        "in",
        "out",
        "on",
        "off",
        "over",
        "under",
        "again",
        "further",
        "then",
        "once",
        "here",
        "there",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "no",
        "nor",
        "not",
        "only",
        "own",
        "same",
        "so",
        "than",
        "too",
        "very",
        "s",
        "t",
        "d",
        "ll",
        "m",
        "o",
        "re",
        "ve",
        "y",
        "can",
        "will",
        "just",
    ]
)
_WORD = re.compile(r"\w+(?:'\w+)*", re.UNICODE)  # "don't" and "teapot's" stay one word


def analysis_for(language: Language) -> str:
    """The analysis name a new collection records for a ``retrieval.language``."""
    return next(name for name, lang in ANALYSES.items() if lang == language)


@lru_cache(maxsize=1)
def _stemmer():
    import snowballstemmer

    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


def tokens(text: str, analysis: str) -> list[str]:
    """The terms BM25 indexes for ``text`` under ``analysis`` (a name of ANALYSES)."""
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    if analysis != "english-snowball-1":
        return words
    out = []
    for word in words:
        if any(ch.isdigit() for ch in word):
            out.append(word)  # identifiers and codes: matched exactly
        elif word not in STOP_WORDS:
            out.append(_stem(word))
    return out


def analyze(text: str, analysis: str) -> str:
    """``text`` as BM25 should see it: its terms joined by spaces (Milvus's standard
    analyzer then splits them again unchanged). Legacy and ``none`` keep the text."""
    if analysis in (LEGACY, "none"):
        return text
    return " ".join(tokens(text, analysis))
