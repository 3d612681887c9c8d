"""Canonical rows -> the rows each stage trains or evaluates on: SFT, preference, prompt-only and scope-eval
(safety and scope-eval rows go through scope.py), each tagged with its source.
"""

import random

from align.data import scope as scope_mod
from align.data.filters import Item


def _with_source(item: Item) -> dict:
    return {**item.row, "source": item.row.get("source") or item.source}


def _sft_prompt(row: dict) -> dict | None:
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    if last == 0 or msgs[last - 1]["role"] != "user":
        return None
    return {"prompt": msgs[:last], "source": row["source"]}


def convert(items: list, cfg, to_sft: dict, rng: random.Random) -> tuple[list, list, list]:
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


def scope_eval_row(item: Item) -> dict:
    """A safety or scope-eval row as a scope_eval.jsonl row (safety: unsafe -> refuse, safe -> answer)."""
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


def add_system(rows: list, key: str, system: str | None) -> list:
    """Rows whose conversation (`key`) starts with the system prompt, unless it has a system turn already."""
    if not system:
        return rows
    msg = {"role": "system", "content": system}
    return [r if r[key][0]["role"] == "system" else {**r, key: [msg] + r[key]} for r in rows]

