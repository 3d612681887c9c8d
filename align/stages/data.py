"""Stage data: build the recipe in cfg.data, print the per-source table, write the splits.

outputs/<run.name>/data/ gets sft_train.jsonl ... scope_eval.jsonl, stats.json, and (written last by
runs.finish) manifest.json. Later stages reuse these files when the data config is unchanged. When the
recipe has a length filter, the model's tokenizer is loaded so lengths are counted in its tokens,
exactly as a later stage building the data itself would count them. It also prints the length budget: per source,
how many SFT answers the SFT stage's trainer.max_length cuts and what share of answer tokens is lost.
"""

import logging
import time

from align import AlignError, models, runs
from align.config import stage_view
from align.data import budget, recipes, stats_table, store

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    started = time.time()
    out = runs.prepare(cfg.run, "data")
    try:
        tokenizer = models.load_tokenizer(cfg.model) if recipes.needs_tokenizer(cfg) else None
        built = recipes.build(cfg, tokenizer)
    except BaseException:
        if not any(out.iterdir()):  # a bad source leaves no empty stage folder behind
            out.rmdir()
        raise
    table = stats_table.print_table(built.stats)
    print(table)
    store.write(built, out)
    metrics = {**stats_table.summary(built), **length_budget(cfg, built, tokenizer)}
    log.info("data: wrote %s to %s", ", ".join(f"{k} {v}" for k, v in built.sizes().items()), out)
    runs.finish(out, cfg, "data", metrics=metrics, parents={}, data_fingerprint=built.fingerprint, started=started)
    return metrics


def length_budget(cfg, built, tokenizer) -> dict:
    """Print how much of each source's SFT answers the SFT stage's max_length cuts; warn past a quarter."""
    if not built.sft_train:
        return {}
    max_length = stage_view("sft").trainer.max_length
    if tokenizer is None:
        try:
            tokenizer = models.load_tokenizer(cfg.model)
        except (AlignError, OSError, ValueError) as e:  # a hub model offline: the build itself needs no tokenizer
            log.warning("data: length budget not measured (tokenizer of %s: %s)", cfg.model.name_or_path, e)
            return {}
    budgets = budget.measure(built.sft_train, tokenizer, max_length)
    print(budget.table(budgets, max_length))
    budget.warn(budgets, max_length)
    return budget.summary(budgets)
