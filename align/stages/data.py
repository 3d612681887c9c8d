"""Stage data: build the recipe in cfg.data, print the per-source table, write the splits.

outputs/<run.name>/data/ gets sft_train.jsonl ... scope_eval.jsonl, stats.json, and (written last by
runs.finish) manifest.json. Later stages reuse these files when the data config is unchanged. When the
recipe has a length filter, the model's tokenizer is loaded so lengths are counted in its tokens,
exactly as a later stage building the data itself would count them.
"""

import logging
import time

from align import models, runs
from align.data import recipes

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    started = time.time()
    out = runs.prepare(cfg, "data")
    try:
        tokenizer = models.load_tokenizer(cfg.model) if recipes.needs_tokenizer(cfg) else None
        built = recipes.build(cfg, tokenizer)
    except BaseException:
        if not any(out.iterdir()):  # a bad source leaves no empty stage folder behind
            out.rmdir()
        raise
    table = recipes.print_table(built.stats)
    print(table)
    recipes.write(built, out)
    metrics = recipes.summary(built)
    log.info("data: wrote %s to %s", ", ".join(f"{k} {v}" for k, v in built.sizes().items()), out)
    runs.finish(out, cfg, "data", metrics=metrics, parents={}, data_fingerprint=built.fingerprint, started=started)
    return metrics
