"""Recipes: the `data` config group turned into train/eval rows for every stage.

build(cfg) = load each source (sources.py) -> run the filter chain on the pooled rows -> apply each
source's count/weight -> hold out eval_fraction -> turn rows into the stage formats: SFT, preference,
prompt-only and scope-eval (safety and scope-eval rows go through scope.py). Everything random is
seeded from cfg.seed, so a build is deterministic. Every row removed or added is counted per source
in the stats table: rows - dropped + added + resampled - held_out = kept.
"""

import hashlib
import json
import logging
import math
import random
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from align import AlignError
from align.config import SourceConfig
from align.data import formats, scope as scope_mod, scoped, sources

log = logging.getLogger(__name__)

OUTPUTS = ("sft_train", "sft_eval", "pref_train", "pref_eval", "prompts_train", "prompts_eval", "scope_eval")
KIND_OUTPUTS = {"sft": ("sft_train", "sft_eval"), "preference": ("pref_train", "pref_eval"),
                "prompt": ("prompts_train", "prompts_eval"), "scope_eval": (None, "scope_eval")}
# per-source build options (besides the loader's and the adapter's): to_sft, and the scope card's pool and attack options
BUILD_OPTIONS = ("to_sft", *scoped.POOL_OPTIONS, *scoped.COMPOSE_OPTIONS)


@dataclass
class Built:
    sft_train: list = field(default_factory=list)
    sft_eval: list = field(default_factory=list)
    pref_train: list = field(default_factory=list)
    pref_eval: list = field(default_factory=list)
    prompts_train: list = field(default_factory=list)
    prompts_eval: list = field(default_factory=list)
    scope_eval: list = field(default_factory=list)
    stats: list = field(default_factory=list)
    fingerprint: str = ""
    config_fingerprint: str = ""

    def sizes(self) -> dict:
        return {name: len(getattr(self, name)) for name in OUTPUTS}


@dataclass
class Item:
    """One canonical row on its way through the build."""
    row: dict
    kind: str
    source: str
    split: str


# --- config helpers -----------------------------------------------------------------------------

def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def source_configs(cfg) -> list:
    """data.sources plus the data.train_files/eval_files (SFT rows) and rl_files (scope-eval rows) shortcuts."""
    out = []
    for raw in _plain(cfg.data.sources) or []:
        src = SourceConfig(**raw)
        src.options = dict(src.options or {})
        out.append(src)
    for split, files in (("train", cfg.data.train_files), ("eval", cfg.data.eval_files)):
        for i, path in enumerate(files or []):
            out.append(SourceConfig(name=f"{split}_files[{i}]", path=str(path), kind="sft", split=split))
    for i, path in enumerate(cfg.data.rl_files or []):
        out.append(SourceConfig(name=f"rl_files[{i}]", path=str(path), kind="scope_eval", split="rl"))
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AlignError(f"data.sources: source names must be unique, repeated: {', '.join(dupes)}")
    if not out:
        raise AlignError(f"data recipe '{cfg.data.recipe}' has no sources; set data.sources or data.train_files")
    return out


def _loader_view(src: SourceConfig) -> SourceConfig:
    """The source as sources.py sees it: without this module's build options."""
    opts = {k: v for k, v in src.options.items() if k not in BUILD_OPTIONS}
    return SourceConfig(name=src.name, path=src.path, adapter=src.adapter, kind=src.kind, split=src.split,
                        count=src.count, weight=src.weight, options=opts)


def _file_digest(path: Path) -> str:
    if path.stat().st_size > 256 << 20:  # huge files: size and mtime stand in for the content
        return f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def needs_tokenizer(cfg) -> bool:
    """A length filter counts the model's tokens, so every stage (data included) passes the tokenizer."""
    return any(spec[1] == "length" for spec in filter_specs(cfg))


def config_fingerprint(cfg) -> str:
    """What a build depends on: data + scope config, seed, the content of local source files, and the
    tokenizer when a length filter counts tokens."""
    # reuse_built, rejected_source and chosen_source (applied by the dpo, kto and rm stages) and dev_files (read by
    # the stages that tune on them) do not change the files
    data = {k: v for k, v in _plain(cfg.data).items()
            if k not in ("reuse_built", "rejected_source", "chosen_source", "dev_files")}
    files = {}
    for src in source_configs(cfg):
        path = sources.resolve(src.path)
        if path is not None:
            files[src.path] = _file_digest(path)
    tokenizer = cfg.model.name_or_path if needs_tokenizer(cfg) else None
    if cfg.data.teacher == "base":  # the teacher's answers are part of the build
        data["teacher"] = cfg.model.name_or_path
    blob = {"data": data, "scope": _plain(cfg.scope), "seed": cfg.seed, "files": files, "tokenizer": tokenizer}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


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
    specs = []
    for i, raw in enumerate(_plain(cfg.data.filters) or []):
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


# --- the build ---------------------------------------------------------------------------------

def _apply_card(srcs: list, rows: dict, stats: dict) -> None:
    """Pool options: drop the categories the card claims (drop_categories) and rows near in-scope prompts (near)."""
    for src in srcs:
        opts = src.options
        if "drop_categories" in opts:
            rows[src.name], n = scoped.drop_claimed(rows[src.name], opts["drop_categories"])
            stats[src.name]["dropped"]["card"] = n
        if "near" in opts and src.path != scoped.COMPOSE:
            refs = [formats.prompt_text(r, "safety") for r in rows[_named(opts["near"], rows, src)]]
            rows[src.name], n = scoped.drop_near(rows[src.name], refs, opts.get("near_threshold",
                                                                                 scoped.NEAR_THRESHOLD))
            stats[src.name]["dropped"]["near_in_scope"] = n


def _teach(cfg, srcs: list, rows: dict, stats: dict) -> None:
    """data.teacher answers the in-scope training rows that came without an answer (teacher.py)."""
    from align.data import teacher
    from align.evaluation.judges import REFUSED, make_judge

    todo = [s for s in srcs if s.split == "train" and s.kind == "safety"
            and any(teacher.needs_answer(r) for r in rows[s.name])]
    if not todo:
        return
    budget = int(cfg.data.teacher_max_new_tokens)
    generate, tokenizer = teacher.model_generate(cfg, budget)
    judge = make_judge("keyword", refusal_openers=scope_mod.refusal_openers(cfg.scope))

    def refused(prompt, answer):
        return judge.judge([prompt], [answer])[0] == REFUSED

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for src in todo:
        taught = teacher.teach(rows[src.name], generate, count, refused, budget)
        rows[src.name] = taught.rows
        stats[src.name]["dropped"].update(teacher_refused=taught.refused, teacher_cut=taught.cut)
        log.info("data.teacher: source '%s': %d answered, %d refusals and %d cut answers dropped", src.name,
                 sum(1 for r in taught.rows if r.get("response")), taught.refused, taught.cut)


def _named(name: str, rows: dict, src: SourceConfig) -> str:
    if name not in rows:
        raise AlignError(f"data source '{src.name}': options names source {name!r}, which is not a loaded source "
                         f"of this recipe ({', '.join(rows)})")
    return name


def _compose_attacks(src: SourceConfig, rows: dict, seed: int) -> list:
    """Attack rows wrapping the refuse rows of options.wrap in the templates of options.templates (train/eval)."""
    opts = src.options
    if src.count is None or src.count < 1:
        raise AlignError(f"data source '{src.name}': compose:attacks needs count >= 1 (how many attacks to compose)")
    wrap = opts.get("wrap") or []
    pool = [r for name in wrap for r in rows[_named(name, rows, src)]]
    inner = [formats.prompt_text(r, "safety") for r in rows[_named(opts["near"], rows, src)]] if "near" in opts else []
    tmpls = scoped.templates(opts.get("templates", src.split if src.split != "rl" else "train"), seed,
                             opts.get("template_eval_fraction", 0.25), opts.get("max_words"))
    return scoped.compose(pool, tmpls, src.count, random.Random(f"{seed}:attacks:{src.name}"), inner)


def _new_stats(src: SourceConfig, loaded) -> dict:
    return {"source": src.name, "split": src.split, "kind": src.kind, "read": loaded.read, "bad": loaded.bad,
            "unmapped": loaded.unmapped, "rows": len(loaded.rows), "dropped": {}, "added": {}, "resampled": 0,
            "held_out": 0, "kept": 0}


def _track(stats: dict, label: str, before: Counter, after: Counter) -> None:
    for name in stats:
        delta = after[name] - before[name]
        stats[name]["dropped"].setdefault(label, 0)
        if delta < 0:
            stats[name]["dropped"][label] += -delta
        elif delta > 0:
            stats[name]["added"][label] = stats[name]["added"].get(label, 0) + delta


def _mix(items: list, src: SourceConfig, seed: int) -> list:
    """Apply the source's count (exactly N rows) or weight (N = weight x rows); upsample past 100%."""
    if src.count is None and src.weight is None:
        return items
    target = src.count if src.count is not None else round(src.weight * len(items))
    if target < 0:
        raise AlignError(f"data source '{src.name}': count/weight must not be negative")
    rng = random.Random(f"{seed}:mix:{src.name}")
    if target <= len(items):
        return [items[i] for i in sorted(rng.sample(range(len(items)), target))]
    if not items:
        return items
    return items + [Item(it.row, it.kind, it.source, it.split) for it in rng.choices(items, k=target - len(items))]


def _hold_out(train: list, fraction: float, seed: int) -> tuple[list, list]:
    """Move whole prompt groups (copies of a prompt stay together) to eval, deterministically."""
    groups = defaultdict(list)
    for it in train:
        groups[normalize(formats.prompt_text(it.row, it.kind))].append(it)
    keys = sorted(groups)
    random.Random(f"{seed}:eval_split").shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(fraction * len(keys)))) if len(keys) > 1 else 0
    held = set(keys[:n_eval])
    keep = [it for it in train if normalize(formats.prompt_text(it.row, it.kind)) not in held]
    moved = [it for it in train if normalize(formats.prompt_text(it.row, it.kind)) in held]
    return keep, moved


def _with_source(item: Item) -> dict:
    return {**item.row, "source": item.row.get("source") or item.source}


def _sft_prompt(row: dict) -> dict | None:
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last == 0 or msgs[last - 1]["role"] != "user":
        return None
    return {"prompt": msgs[:last], "source": row["source"]}


def _convert(items: list, cfg, to_sft: dict, rng: random.Random) -> tuple[list, list, list]:
    """Canonical rows -> (sft, preference, prompt) rows; safety/scope-eval rows go through scope.py."""
    sft, pref, prompts, guard = [], [], [], []
    for it in items:
        row = {k: v for k, v in _with_source(it).items() if k != "id"}
        if it.kind == "sft":
            sft.append(row)
            p = _sft_prompt(row)
            if p:
                prompts.append(p)
        elif it.kind == "preference":
            pref.append(row)
            if to_sft.get(it.source, True):
                sft.append({"messages": row["prompt"] + row["chosen"], "source": row["source"]})
            prompts.append({"prompt": row["prompt"], "source": row["source"]})
        elif it.kind == "prompt":
            prompts.append(row)
        else:
            guard.append(row)
    sft += scope_mod.sft_examples(guard, cfg.scope, rng)
    pref += scope_mod.preference_pairs(guard, cfg.scope, rng, cfg.data.over_refusal_topic)
    prompts += scope_mod.prompt_rows(guard, cfg.scope)
    return sft, pref, prompts


def _scope_eval_row(item: Item) -> dict:
    row = _with_source(item)
    if item.kind == "safety":
        cats = row["categories"] or ["general"]
        attack = next((c.split("/", 1)[1] for c in cats if c.startswith("attack/")), None)
        return {"prompt": row["prompt"], "expected": "refuse" if scope_mod.is_refuse(row) else "answer",
                "category": cats[0], "attack": attack, "source": row["source"]}
    out = {k: row.get(k) for k in ("prompt", "expected", "category", "attack", "source")}
    if row.get("system"):
        out["system"] = row["system"]
    return out


def _add_system(rows: list, key: str, system: str | None) -> list:
    if not system:
        return rows
    msg = {"role": "system", "content": system}
    return [r if r[key][0]["role"] == "system" else {**r, key: [msg] + r[key]} for r in rows]


def build(cfg, tokenizer=None) -> Built:
    """Build the recipe in cfg.data (data.rejected_source/chosen_source=policy are applied later, by the dpo, kto and
    rm stages)."""
    if cfg.data.rejected_source not in ("template", "policy"):
        raise AlignError(f"data.rejected_source must be template or policy, got {cfg.data.rejected_source!r}")
    if cfg.data.chosen_source not in ("reference", "policy"):
        raise AlignError(f"data.chosen_source must be reference or policy, got {cfg.data.chosen_source!r}")
    if cfg.data.over_refusal_topic not in ("own", "off_scope", "mixed"):
        raise AlignError(f"data.over_refusal_topic must be own, off_scope or mixed, "
                         f"got {cfg.data.over_refusal_topic!r}")
    if cfg.data.scope and cfg.data.scope != cfg.scope.name:
        raise AlignError(f"data recipe '{cfg.data.recipe}' is written for scope '{cfg.data.scope}', but the scope "
                         f"composed is named '{cfg.scope.name}': pass scope={cfg.data.scope} (or drop scope=), check "
                         f"that conf/scope/{cfg.data.scope}.yaml says name: {cfg.data.scope}, or set data.scope=null "
                         f"to build it under any scope")
    scope_mod.check_templates(cfg.scope)
    if not 0 <= cfg.data.eval_fraction < 1:
        raise AlignError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    srcs = source_configs(cfg)
    specs = filter_specs(cfg)
    for src in srcs:
        sources.check_source(_loader_view(src))
    seed = int(cfg.seed)
    stats, rows = {}, {}
    for src in srcs:
        if src.options.get("optional") and sources.resolve(src.path) is None:  # an optional file the kit lacks
            log.info("data source '%s': optional file %s not found; 0 rows", src.name, src.path)
            stats[src.name], rows[src.name] = _new_stats(src, sources.Loaded()), []
        elif src.path != scoped.COMPOSE:
            loaded = sources.load_source(_loader_view(src), cfg.data.on_bad_rows)
            stats[src.name], rows[src.name] = _new_stats(src, loaded), loaded.rows
    _apply_card(srcs, rows, stats)
    if cfg.data.teacher:
        _teach(cfg, srcs, rows, stats)
    for src in srcs:
        if src.path == scoped.COMPOSE:
            rows[src.name] = _compose_attacks(src, rows, seed)
            stats[src.name] = _new_stats(src, sources.Loaded(rows=rows[src.name], read=len(rows[src.name])))
    parts = {"train": [], "eval": [], "rl": []}
    for src in srcs:
        parts[src.split] += [Item(row, src.kind, src.name, src.split) for row in rows[src.name]]
    train, evals, rl = parts["train"], parts["eval"], parts["rl"]

    ctx = Ctx(seed, tokenizer, cfg.data.target_size, cfg.data.balance_cap)
    for label, name, params in specs:
        before = Counter(it.source for it in train + evals + rl)
        train, evals = FILTERS[name][0](train, evals, params, ctx)
        if rl:  # rollout prompts go through the same filters, after (and so never near) eval and training prompts
            rl, _ = FILTERS[name][0](rl, evals + train, params, ctx)
        _track(stats, label, before, Counter(it.source for it in train + evals + rl))

    by_source = defaultdict(list)
    for it in train + evals + rl:
        by_source[it.source].append(it)
    parts = {"train": [], "eval": [], "rl": []}
    for src in srcs:
        mixed = _mix(by_source[src.name], src, seed)
        stats[src.name]["resampled"] = len(mixed) - len(by_source[src.name])
        parts[src.split] += mixed
    train, evals, rl = parts["train"], parts["eval"], parts["rl"]

    held = []
    if cfg.data.eval_fraction > 0 and not any(it.kind != "scope_eval" for it in evals):
        train, held = _hold_out(train, cfg.data.eval_fraction, seed)
        for name, n in Counter(it.source for it in held).items():
            stats[name]["held_out"] = n
    for name, n in Counter(it.source for it in train + evals + rl).items():
        stats[name]["kept"] = n

    to_sft = {s.name: bool(s.options.get("to_sft", True)) for s in srcs}
    eval_items = [it for it in evals if it.kind != "scope_eval"] + held
    sft_tr, pref_tr, prm_tr = _convert(train, cfg, to_sft, random.Random(f"{seed}:train"))
    sft_ev, pref_ev, prm_ev = _convert(eval_items, cfg, to_sft, random.Random(f"{seed}:eval"))
    if rl:  # rollouts on prompts the SFT policy never trained on, as InstructGPT kept its PPO prompts apart
        prm_tr = _convert(rl, cfg, to_sft, random.Random(f"{seed}:rl"))[2]
    system = cfg.scope.system_prompt
    shuffle = random.Random(f"{seed}:shuffle")
    built = Built(
        sft_train=_add_system(sft_tr, "messages", system), sft_eval=_add_system(sft_ev, "messages", system),
        pref_train=_add_system(pref_tr, "prompt", system), pref_eval=_add_system(pref_ev, "prompt", system),
        prompts_train=_add_system(prm_tr, "prompt", system), prompts_eval=_add_system(prm_ev, "prompt", system),
        scope_eval=[_scope_eval_row(it) for it in evals if it.kind in ("scope_eval", "safety")],
        stats=[stats[s.name] for s in srcs],
    )
    for name in ("sft_train", "pref_train", "prompts_train"):
        shuffle.shuffle(getattr(built, name))  # sources arrive in blocks; trainers should not see them so
    for name, kind in (("sft_train", "sft"), ("sft_eval", "sft"), ("pref_train", "preference"),
                       ("pref_eval", "preference"), ("prompts_train", "prompt"), ("prompts_eval", "prompt"),
                       ("scope_eval", "scope_eval")):
        for i, row in enumerate(getattr(built, name)):
            try:
                formats.validate(row, kind)
            except ValueError as e:  # a bug in a builder, not in the user's data
                raise AlignError(f"data recipe '{cfg.data.recipe}': built {name}[{i}] is invalid: {e}") from None
    built.config_fingerprint = config_fingerprint(cfg)
    rows = {name: getattr(built, name) for name in OUTPUTS}
    built.fingerprint = hashlib.sha256(json.dumps({"config": built.config_fingerprint, "rows": rows},
                                                  sort_keys=True).encode()).hexdigest()
    _FINGERPRINTS[built.config_fingerprint] = built.fingerprint
    log.info("data recipe '%s': %s", cfg.data.recipe, ", ".join(f"{k} {v}" for k, v in built.sizes().items() if v))
    return built


# --- reading, writing, reuse ------------------------------------------------------------------------

_FINGERPRINTS: dict = {}  # config fingerprint -> built fingerprint, for fingerprint(cfg)


def data_dir(cfg) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name / "data"


def _write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write(built: Built, out_dir: Path) -> None:
    """The seven split files and stats.json (per-source stats, sizes, fingerprints)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        _write_jsonl(out_dir / f"{name}.jsonl", getattr(built, name))
    summary = {"sources": built.stats, "sizes": built.sizes(), "fingerprint": built.fingerprint,
               "config_fingerprint": built.config_fingerprint}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")


def _reusable(cfg) -> dict | None:
    """stats.json of a finished data stage built from this very config, if any."""
    out = data_dir(cfg)
    if not cfg.data.reuse_built or not (out / "manifest.json").exists() or not (out / "stats.json").exists():
        return None
    info = json.loads((out / "stats.json").read_text())
    if info.get("config_fingerprint") != config_fingerprint(cfg):
        log.info("data: %s was built from another data config or other source files; building afresh", out)
        return None
    return info


def load(cfg, kind: str, tokenizer=None) -> tuple[list, list]:
    """(train, eval) rows of `kind` (sft, preference, prompt or scope_eval; scope_eval: ([], rows)).
    Reads outputs/<run.name>/data/ when it holds a finished build of the same config, else builds."""
    if kind not in KIND_OUTPUTS:
        raise AlignError(f"data kind must be one of {', '.join(KIND_OUTPUTS)}, got {kind!r}")
    train_name, eval_name = KIND_OUTPUTS[kind]
    info = _reusable(cfg)
    if info is not None:
        out = data_dir(cfg)
        log.info("data: reusing the build in %s", out)
        _FINGERPRINTS[info["config_fingerprint"]] = info["fingerprint"]
        train = _read_jsonl(out / f"{train_name}.jsonl") if train_name else []
        evals = _read_jsonl(out / f"{eval_name}.jsonl")
    else:
        built = build(cfg, tokenizer)
        train = getattr(built, train_name) if train_name else []
        evals = getattr(built, eval_name)
    if train_name and not train:
        raise AlignError(f"data recipe '{cfg.data.recipe}' has no {kind} training rows; choose a recipe that "
                         f"makes them (data=...) or add a source of kind {kind}")
    if cfg.data.max_rows:  # quick smoke runs: N rows of each split, spread over the whole split
        n = cfg.data.max_rows
        train, evals = train[:: max(1, len(train) // n)][:n], evals[:: max(1, len(evals) // n)][:n]
    return train, evals


def fingerprint(cfg) -> str:
    """The fingerprint of the data load(cfg, ...) returns (for manifests)."""
    cfp = config_fingerprint(cfg)
    if cfp not in _FINGERPRINTS:
        info = _reusable(cfg)
        if info is not None:
            _FINGERPRINTS[cfp] = info["fingerprint"]
        else:
            build(cfg)
    return _FINGERPRINTS[cfp]


def print_table(stats: list) -> str:
    """A fixed-width table: one line per source, filter columns as -dropped/+added, and a total."""
    filters = []
    for s in stats:
        for name in list(s["dropped"]) + list(s["added"]):
            if name not in filters:
                filters.append(name)
    cols = ["source", "split", "kind", "read", "bad", "unmapped", "rows", *filters, "resampled", "held_out", "kept"]

    def cells(s):
        def signed(name):
            delta = s["added"].get(name, 0) - s["dropped"].get(name, 0)
            return f"{delta:+d}" if delta else "0"
        return [s["source"], s["split"], s["kind"], *(str(s[k]) for k in ("read", "bad", "unmapped", "rows")),
                *(signed(f) for f in filters), f"{s['resampled']:+d}" if s["resampled"] else "0",
                str(s["held_out"]), str(s["kept"])]

    lines = [cells(s) for s in stats]
    total = {"source": "total", "split": "", "kind": "", "resampled": sum(s["resampled"] for s in stats),
             **{k: sum(s[k] for s in stats) for k in ("read", "bad", "unmapped", "rows", "held_out", "kept")},
             "dropped": {f: sum(s["dropped"].get(f, 0) for s in stats) for f in filters},
             "added": {f: sum(s["added"].get(f, 0) for s in stats) for f in filters}}
    lines.append(cells(total))
    widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]

    def fmt(row):
        return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cols), rule, *(fmt(r) for r in lines[:-1]), rule, fmt(lines[-1])])


def summary(built: Built) -> dict:
    """Flat metrics for metrics.json: output sizes and totals of the stats table."""
    out = {f"rows/{k}": v for k, v in built.sizes().items()}
    for key in ("read", "bad", "unmapped", "kept"):
        out[f"sources/{key}"] = sum(s[key] for s in built.stats)
    return out
