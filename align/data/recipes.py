"""Recipes: the `data` config group turned into train/eval rows for every stage.

build(cfg) = load each source (sources.py) -> the card's pool options, the teacher's answers and the composed attacks
(scoped.py, teacher.py) -> run the filter chain on the pooled rows (filters.py) -> apply each
source's count/weight -> hold out eval_fraction -> turn rows into the stage formats: SFT, preference,
prompt-only and scope-eval (stage_rows.py; safety and scope-eval rows go through scope.py). Everything random is
seeded from cfg.seed, so a build is deterministic. Every row removed or added is counted per source
in the stats table (stats_table.py): rows - dropped + added + resampled - held_out = kept. load(cfg, kind) reads a
finished build of the same config back (store.py), or builds.
"""

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from align import AlignError
from align.config import SourceConfig
from align.data import filters, formats, scope as scope_mod, scoped, sources, stage_rows, stats_table, store, teacher
from align.data.filters import Item, normalize
from align.data.store import Built

log = logging.getLogger(__name__)

# per-source build options (besides the loader's and the format's): to_sft, and the scope card's pool and attack options
BUILD_OPTIONS = ("to_sft", *scoped.POOL_OPTIONS, *scoped.COMPOSE_OPTIONS)


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
    return replace(src, options=opts)


def _file_digest(path: Path) -> str:
    if path.stat().st_size > 256 << 20:  # huge files: size and mtime stand in for the content
        return f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def needs_tokenizer(cfg) -> bool:
    """A length filter counts the model's tokens, so every stage (data included) passes the tokenizer."""
    return any(spec[1] == "length" for spec in filters.filter_specs(cfg))


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



# --- the build: a list of phases --------------------------------------------------------------

def build(cfg, tokenizer=None) -> Built:
    """Build the recipe in cfg.data (data.rejected_source/chosen_source=policy are applied later, by the dpo, kto and
    rm stages)."""
    _check_data_config(cfg)
    srcs = source_configs(cfg)
    specs = filters.filter_specs(cfg)
    for src in srcs:
        sources.check_source(_loader_view(src))
    seed = int(cfg.seed)
    rows, stats = _load_sources(cfg, srcs)
    scoped.apply_card(srcs, rows, stats)
    if cfg.data.teacher:
        teacher.teach_sources(cfg, srcs, rows, stats)
    _compose_attacks(srcs, rows, stats, seed)
    ctx = filters.Ctx(seed, tokenizer, cfg.data.target_size, cfg.data.balance_cap)
    train, evals, rl = _run_filters(_by_split(srcs, rows), specs, stats, ctx)
    train, evals, rl = _mix_sources(srcs, train + evals + rl, stats, seed)
    train, held = _hold_out_eval(cfg, train, evals, rl, stats, seed)
    built = _outputs(cfg, srcs, (train, evals, rl, held), seed)
    built.stats = [stats[s.name] for s in srcs]
    _check_outputs(cfg, built)
    _seal(cfg, built)
    log.info("data recipe '%s': %s", cfg.data.recipe, ", ".join(f"{k} {v}" for k, v in built.sizes().items() if v))
    return built


def _check_data_config(cfg) -> None:
    """Fail on data-config mistakes (and a recipe written for another scope) before reading anything."""
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


def _load_sources(cfg, srcs: list) -> tuple[dict, dict]:
    """(rows, stats) by source name of the sources read from a file, the hub or pyrit:harm (not compose:attacks)."""
    stats, rows = {}, {}
    for src in srcs:
        if src.options.get("optional") and sources.resolve(src.path) is None:  # an optional file the kit lacks
            log.info("data source '%s': optional file %s not found; 0 rows", src.name, src.path)
            stats[src.name], rows[src.name] = stats_table.new_stats(src, sources.Loaded()), []
        elif src.path != scoped.COMPOSE:
            loaded = sources.load_source(_loader_view(src), cfg.data.on_bad_rows)
            stats[src.name], rows[src.name] = stats_table.new_stats(src, loaded), loaded.rows
    return rows, stats


def _compose_attacks(srcs: list, rows: dict, stats: dict, seed: int) -> None:
    """The compose:attacks sources, made after the card and the teacher from the rows those left."""
    for src in srcs:
        if src.path == scoped.COMPOSE:
            rows[src.name] = scoped.compose_attacks(src, rows, seed)
            stats[src.name] = stats_table.new_stats(src, sources.Loaded(rows=rows[src.name], read=len(rows[src.name])))


def _by_split(srcs: list, rows: dict) -> tuple[list, list, list]:
    """(train, eval, rl) Items, in source order."""
    parts = {"train": [], "eval": [], "rl": []}
    for src in srcs:
        parts[src.split] += [Item(row, src.kind, src.name, src.split) for row in rows[src.name]]
    return parts["train"], parts["eval"], parts["rl"]


def _run_filters(parts: tuple, specs: list, stats: dict, ctx: filters.Ctx) -> tuple[list, list, list]:
    """The filter chain in order; what each filter drops or adds is counted per source under its label."""
    train, evals, rl = parts
    for label, name, params in specs:
        before = Counter(it.source for it in train + evals + rl)
        train, evals = filters.FILTERS[name][0](train, evals, params, ctx)
        if rl:  # rollout prompts go through the same filters, after (and so never near) eval and training prompts
            rl, _ = filters.FILTERS[name][0](rl, evals + train, params, ctx)
        stats_table.track(stats, label, before, Counter(it.source for it in train + evals + rl))
    return train, evals, rl


def _mix_sources(srcs: list, items: list, stats: dict, seed: int) -> tuple[list, list, list]:
    """Each source's count/weight applied (_mix); (train, eval, rl) Items again, in source order."""
    by_source = defaultdict(list)
    for it in items:
        by_source[it.source].append(it)
    parts = {"train": [], "eval": [], "rl": []}
    for src in srcs:
        mixed = _mix(by_source[src.name], src, seed)
        stats[src.name]["resampled"] = len(mixed) - len(by_source[src.name])
        parts[src.split] += mixed
    return parts["train"], parts["eval"], parts["rl"]


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



def _hold_out_eval(cfg, train: list, evals: list, rl: list, stats: dict, seed: int) -> tuple[list, list]:
    """(train, held): data.eval_fraction of the training prompts held out, unless an eval source already gives SFT,
    preference, prompt or safety rows; counts held_out and kept per source."""
    held = []
    if cfg.data.eval_fraction > 0 and not any(it.kind != "scope_eval" for it in evals):
        train, held = _hold_out(train, cfg.data.eval_fraction, seed)
        for name, n in Counter(it.source for it in held).items():
            stats[name]["held_out"] = n
    for name, n in Counter(it.source for it in train + evals + rl).items():
        stats[name]["kept"] = n
    return train, held


def _outputs(cfg, srcs: list, parts: tuple, seed: int) -> Built:
    """The seven outputs from the (train, eval, rl, held) Items: stage rows with the card's system prompt, the
    training files shuffled."""
    train, evals, rl, held = parts
    to_sft = {s.name: bool(s.options.get("to_sft", True)) for s in srcs}
    eval_items = [it for it in evals if it.kind != "scope_eval"] + held
    sft_tr, pref_tr, prm_tr = stage_rows.convert(train, cfg, to_sft, random.Random(f"{seed}:train"))
    sft_ev, pref_ev, prm_ev = stage_rows.convert(eval_items, cfg, to_sft, random.Random(f"{seed}:eval"))
    if rl:  # rollouts on prompts the SFT policy never trained on, as InstructGPT kept its PPO prompts apart
        prm_tr = stage_rows.convert(rl, cfg, to_sft, random.Random(f"{seed}:rl"))[2]
    system, add = cfg.scope.system_prompt, stage_rows.add_system
    shuffle = random.Random(f"{seed}:shuffle")
    built = Built(
        sft_train=add(sft_tr, "messages", system), sft_eval=add(sft_ev, "messages", system),
        pref_train=add(pref_tr, "prompt", system), pref_eval=add(pref_ev, "prompt", system),
        prompts_train=add(prm_tr, "prompt", system), prompts_eval=add(prm_ev, "prompt", system),
        scope_eval=[stage_rows.scope_eval_row(it) for it in evals if it.kind in ("scope_eval", "safety")],
    )
    for name in ("sft_train", "pref_train", "prompts_train"):
        shuffle.shuffle(getattr(built, name))  # sources arrive in blocks; trainers should not see them so
    return built


def _check_outputs(cfg, built: Built) -> None:
    """Every built row is a valid row of its output's kind."""
    for name, kind in (("sft_train", "sft"), ("sft_eval", "sft"), ("pref_train", "preference"),
                       ("pref_eval", "preference"), ("prompts_train", "prompt"), ("prompts_eval", "prompt"),
                       ("scope_eval", "scope_eval")):
        for i, row in enumerate(getattr(built, name)):
            try:
                formats.validate(row, kind)
            except ValueError as e:  # a bug in a builder, not in the user's data
                raise AlignError(f"data recipe '{cfg.data.recipe}': built {name}[{i}] is invalid: {e}") from None


def _seal(cfg, built: Built) -> None:
    """The build's fingerprints: of its config (for reuse) and of config and rows (for manifests)."""
    built.config_fingerprint = config_fingerprint(cfg)
    rows = {name: getattr(built, name) for name in store.OUTPUTS}
    built.fingerprint = hashlib.sha256(json.dumps({"config": built.config_fingerprint, "rows": rows},
                                                  sort_keys=True).encode()).hexdigest()
    _FINGERPRINTS[built.config_fingerprint] = built.fingerprint


# --- reuse ------------------------------------------------------------------------------------------

_FINGERPRINTS: dict = {}  # config fingerprint -> built fingerprint, for fingerprint(cfg)


def _reusable(cfg) -> dict | None:
    """stats.json of a finished data stage built from this very config, if any."""
    out = store.data_dir(cfg.run)
    if not cfg.data.reuse_built or not (out / "manifest.json").exists() or not (out / "stats.json").exists():
        return None
    info = store.read_stats(out)
    if info.get("config_fingerprint") != config_fingerprint(cfg):
        log.info("data: %s was built from another data config or other source files; building afresh", out)
        return None
    return info


def load(cfg, kind: str, tokenizer=None) -> tuple[list, list]:
    """(train, eval) rows of `kind` (sft, preference, prompt or scope_eval; scope_eval: ([], rows)).
    Reads outputs/<run.name>/data/ when it holds a finished build of the same config, else builds."""
    if kind not in store.KIND_OUTPUTS:
        raise AlignError(f"data kind must be one of {', '.join(store.KIND_OUTPUTS)}, got {kind!r}")
    train_name, eval_name = store.KIND_OUTPUTS[kind]
    info = _reusable(cfg)
    if info is not None:
        out = store.data_dir(cfg.run)
        log.info("data: reusing the build in %s", out)
        _FINGERPRINTS[info["config_fingerprint"]] = info["fingerprint"]
        train = store.read(out, train_name) if train_name else []
        evals = store.read(out, eval_name)
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
