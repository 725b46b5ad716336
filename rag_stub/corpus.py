"""The bundled corpus and a small BM25 retriever, so `rag` mode answers from real sources."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "of",
        "on",
        "or",
        "the",
        "to",
        "what",
        "with",
    ]
)


@dataclass(frozen=True, slots=True)
class Document:
    slug: str
    title: str
    body: str

    @property
    def uri(self) -> str:
        return f"corpus://bali-zero/{self.slug}"


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def load_corpus() -> list[Document]:
    docs = []
    for entry in sorted(resources.files("rag_stub").joinpath("corpus").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".md"):
            continue
        title_line, _, body = entry.read_text(encoding="utf-8").partition("\n")
        docs.append(Document(entry.name.removesuffix(".md"), title_line.lstrip("# ").strip(), body.strip()))
    return docs


class Retriever:
    """Okapi BM25 (k1=1.5, b=0.75) over titles and bodies."""

    def __init__(self, docs: list[Document], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = docs
        self._tf = [Counter(terms(d.title + " " + d.body)) for d in docs]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / max(1, len(docs))
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self._k1, self._b = k1, b

    def search(self, query: str, limit: int = 3) -> list[tuple[Document, float]]:
        q = terms(query)
        scored = []
        for doc, tf, length in zip(self.docs, self._tf, self._len, strict=True):
            score = 0.0
            for t in q:
                f = tf.get(t, 0)
                if f:
                    norm = f + self._k1 * (1 - self._b + self._b * length / self._avg)
                    score += self._idf[t] * f * (self._k1 + 1) / norm
            if score > 0:
                scored.append((doc, round(score, 4)))
        scored.sort(key=lambda pair: (-pair[1], pair[0].slug))
        return scored[:limit]


def compose_answer(query: str, hits: list[tuple[Document, float]]) -> str:
    """A deterministic extractive answer: the best sources' first sentences, cited."""
    if not hits:
        return (
            "I could not find this in the immigration notes. Ask about visas such as the B211A, "
            "the Visa on Arrival, KITAS or KITAP permits, and I will answer from the sources."
        )
    parts = []
    for n, (doc, _score) in enumerate(hits, start=1):
        sentences = re.split(r"(?<=[.!?])\s+", doc.body)
        parts.append(f"{' '.join(sentences[:2])} [{n}]")
    return "\n\n".join(parts)
