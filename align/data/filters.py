"""The filter chain of a recipe (data.filters): length, dedup, style, diversity and balance, run in order on the
pooled rows of all sources.

A filter is (train, evals, params, ctx) -> (train, evals) over Items; recipes.py counts per source what each one
dropped or added. The dedup filter's NearDupIndex (word shingles, Jaccard, MinHash LSH) lives here too.
"""

import math
import random
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from align import AlignError
from align.data import formats


@dataclass
class Item:
    """One canonical row on its way through the build."""
    row: dict
    kind: str
    source: str
    split: str


# --- text helpers shared by the filters ------------------------------------------------------------

def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def shingles(text: str, n: int) -> set:
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDupIndex:
    """Exact (normalized text) + near-duplicate (word-shingle Jaccard >= threshold) lookup.

    MinHash LSH proposes candidates cheaply; each candidate is confirmed with the exact Jaccard, so
    the LSH bands are tuned loose (high recall) and the threshold is exact.
    """

    PRIME = 4294967311  # > 2**32, so (a*x + b) % PRIME fits in uint64 for 32-bit a, b, x

    def __init__(self, ngram: int = 3, threshold: float = 0.8, near: bool = True, num_perm: int = 64):
        self.ngram, self.threshold, self.near = ngram, threshold, near
        self.exact: set = set()
        self.kept: list = []
        gen = np.random.default_rng(1234)
        self.a = gen.integers(1, 2**32 - 1, num_perm, dtype=np.uint64)
        self.b = gen.integers(0, 2**32 - 1, num_perm, dtype=np.uint64)
        # bands x rows = num_perm; the LSH threshold (1/bands)^(1/rows) sits well below ours
        self.rows = next((r for r in (8, 4, 2, 1) if (r / num_perm) ** (1 / r) <= max(0.2, threshold - 0.25)), 1)
        self.bands = num_perm // self.rows
        self.buckets = [defaultdict(list) for _ in range(self.bands)]

    def _signature(self, sh: set) -> np.ndarray:
        x = np.array(sorted(zlib.crc32(s.encode()) for s in sh), dtype=np.uint64)
        return ((np.outer(self.a, x) + self.b[:, None]) % np.uint64(self.PRIME)).min(axis=1)

    def add_if_new(self, text: str) -> bool:
        """True (and remember it) unless `text` duplicates something already added."""
        key = normalize(text)
        if key in self.exact:
            return False
        if self.near:
            sh = shingles(text, self.ngram)
            sig = self._signature(sh)
            bands = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
            candidates = sorted({c for i, band in enumerate(bands) for c in self.buckets[i].get(band, ())})
            if any(jaccard(sh, self.kept[c]) >= self.threshold for c in candidates):
                return False
            for i, band in enumerate(bands):
                self.buckets[i][band].append(len(self.kept))
            self.kept.append(sh)
        self.exact.add(key)
        return True


# --- filters: (train, evals, params, ctx) -> (train, evals) ------------------------------------------

@dataclass
class Ctx:
    seed: int
    tokenizer: object = None
    target_size: int | None = None
    balance_cap: float | None = None


def _text(item: Item, which: str) -> str | None:
    if which == "prompt":
        return formats.prompt_text(item.row, item.kind)
    return formats.response_text(item.row, item.kind)


def _count_tokens(text: str, tokenizer) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def length_filter(train, evals, p, ctx):
    """Keep rows whose response (or prompt, with field: prompt) has min_tokens..max_tokens tokens,
    counted with the tokenizer when one is given, else whitespace words. Rows without one pass."""
    lo, hi, which = p.get("min_tokens", 1), p.get("max_tokens"), p.get("field", "response")

    def ok(item):
        text = _text(item, which)
        if text is None:
            return True
        n = _count_tokens(text, ctx.tokenizer)
        return n >= lo and (hi is None or n <= hi)

    return [it for it in train if ok(it)], evals


def dedup_filter(train, evals, p, ctx):
    """Drop exact and near-duplicate prompts. Eval rows are indexed first, so a training row that
    duplicates an eval prompt is dropped (decontamination); within a split the first row wins."""
    index = NearDupIndex(p.get("ngram", 3), p.get("threshold", 0.8), p.get("near", True))
    which = p.get("field", "prompt")

    def keep(items):
        out = []
        for it in items:
            text = _text(it, which)
            if text is None or index.add_if_new(text):
                out.append(it)
        return out

    evals = keep(evals)
    return keep(train), evals


BOILERPLATE = re.compile(r"\bas an ai\b|\bas an? (?:large )?language model\b|\bi(?:'m| am) (?:just |only )?an ai\b|"
                         r"\bi (?:do not|don't) have (?:personal )?(?:opinions|feelings|emotions|beliefs)\b", re.I)
ANECDOTE = re.compile(r"\bwhen i was (?:a kid|a child|young|younger|growing up|in (?:school|college))\b|"
                      r"\bi remember when\b|\bin my (?:own )?experience\b|\bpersonally,? i\b", re.I)
REFERENCE = re.compile(r"\bas (?:mentioned|stated|noted) (?:above|below|earlier)\b|\bthe other answers?\b|"
                       r"\bsee (?:my|the) (?:comment|answer)\b", re.I)
URL = re.compile(r"https?://\S+|www\.\S+")


def style_filter(train, evals, p, ctx):
    """LIMA-style curation of responses: drop AI boilerplate, first-person anecdotes, references to
    other answers and link-only answers (fewer than min_words words besides the links)."""
    checks = []
    for key, pattern in (("boilerplate", BOILERPLATE), ("anecdotes", ANECDOTE), ("references", REFERENCE)):
        if p.get(key, True):
            checks.append(pattern.search)
    checks += [re.compile(extra, re.I).search for extra in p.get("patterns", [])]
    min_words = p.get("min_words", 5)

    def ok(item):
        text = _text(item, "response")
        if text is None:
            return True
        if p.get("links", True) and URL.search(text) and len(URL.sub(" ", text).split()) < min_words:
            return False
        return not any(check(text) for check in checks)

    return [it for it in train if ok(it)], evals


def diversity_filter(train, evals, p, ctx):
    """TF-IDF vectors of the prompts -> KMeans clusters -> take rows round-robin across clusters
    until target_size, so no single kind of request dominates the kept set."""
    target = p.get("target_size", ctx.target_size)
    if not target:
        raise AlignError("data filter diversity: set target_size (or data.target_size)")
    if len(train) <= target:
        return train, evals
    rng = random.Random(f"{ctx.seed}:diversity")
    texts = [_text(it, "prompt") for it in train]
    k = int(p.get("n_clusters") or min(target, max(2, round(math.sqrt(len(train))))))
    try:
        from sklearn.cluster import KMeans
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectors = TfidfVectorizer(max_features=20000, stop_words="english", sublinear_tf=True).fit_transform(texts)
        labels = KMeans(n_clusters=k, random_state=ctx.seed, n_init=3).fit_predict(vectors)
    except ValueError:  # an empty vocabulary (e.g. only stop words): plain random sample
        labels = np.zeros(len(train), dtype=int)
    clusters = defaultdict(list)
    for i, label in enumerate(labels):
        clusters[int(label)].append(i)
    queues = [rng.sample(clusters[c], len(clusters[c])) for c in sorted(clusters)]
    picked = []
    while len(picked) < target:
        for q in queues:
            if q and len(picked) < target:
                picked.append(q.pop())
    return [train[i] for i in sorted(picked)], evals


def balance_filter(train, evals, p, ctx):
    """Oversample rare categories (rows without one: their source) toward the largest, at most cap x."""
    cap = p.get("cap", ctx.balance_cap or 4)
    groups = defaultdict(list)
    for it in train:
        groups[formats.category_of(it.row, it.kind) or it.source].append(it)
    largest = max((len(g) for g in groups.values()), default=0)
    rng = random.Random(f"{ctx.seed}:balance")
    extra = []
    for name in sorted(groups):
        g = groups[name]
        want = min(largest, int(cap * len(g)))
        extra += [Item(it.row, it.kind, it.source, it.split) for it in rng.choices(g, k=max(0, want - len(g)))]
    return train + extra, evals


FILTERS = {
    "length": (length_filter, ("min_tokens", "max_tokens", "field")),
    "dedup": (dedup_filter, ("threshold", "ngram", "near", "field")),
    "style": (style_filter, ("boilerplate", "anecdotes", "references", "links", "min_words", "patterns")),
    "diversity": (diversity_filter, ("target_size", "n_clusters")),
    "balance": (balance_filter, ("cap",)),
}


def filter_specs(cfg) -> list:
    """(label, name, params) of each data.filters entry, checked against FILTERS; a repeated filter's label gets
    #<index>."""
    entries = cfg.data.filters
    if OmegaConf.is_config(entries):
        entries = OmegaConf.to_container(entries, resolve=True)
    specs = []
    for i, raw in enumerate(entries or []):
        raw = dict(raw)
        name = raw.pop("name", None)
        if name not in FILTERS:
            raise AlignError(f"data.filters[{i}]: unknown filter {name!r}; choices: {', '.join(FILTERS)}")
        bad = sorted(set(raw) - set(FILTERS[name][1]))
        if bad:
            raise AlignError(f"data.filters[{i}] ({name}): unknown parameter {bad[0]!r}; "
                             f"valid: {', '.join(FILTERS[name][1])}")
        label = name if name not in [s[0] for s in specs] else f"{name}#{i}"
        specs.append((label, name, raw))
    return specs
