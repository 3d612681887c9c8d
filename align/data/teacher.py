"""Answers when the user has only questions: in-scope rows without a response get one from a teacher model.

`data.teacher`: null (off), `base` (the run's base model) or any causal LM (hub id, folder or .gguf). The teacher
answers under the card's system prompt plus an instruction to be brief. Answers the judge reads as refusals, and
answers still going at `data.teacher_max_new_tokens` (cut), are dropped and counted: a refusal would teach the model
to refuse its own subject, and a cut answer trains a sentence that never ends.
"""

import logging
from dataclasses import dataclass

from align import AlignError
from align.data import scope as scope_mod

log = logging.getLogger(__name__)

BRIEF = "Answer briefly, in two or three sentences."


@dataclass
class Taught:
    rows: list          # every input row; the ones that needed an answer and got a good one now have it
    refused: int = 0    # rows dropped: the teacher refused
    cut: int = 0        # rows dropped: the answer did not finish within the token budget


def needs_answer(row: dict) -> bool:
    return row.get("label") == "safe" and not row.get("response")


def teach(rows: list, generate_fn, count_tokens, is_refusal, max_new_tokens: int) -> Taught:
    """generate_fn(prompts) -> answers; count_tokens(text) -> int; is_refusal(prompt, answer) -> bool."""
    todo = [i for i, r in enumerate(rows) if needs_answer(r)]
    out = Taught(rows=list(rows))
    if not todo:
        return out
    answers = generate_fn([rows[i]["prompt"] for i in todo])
    drop = set()
    for i, text in zip(todo, answers):
        text = (text or "").strip()
        if not text or is_refusal(rows[i]["prompt"], text):
            out.refused += 1
            drop.add(i)
        elif count_tokens(text) >= max_new_tokens:
            out.cut += 1
            drop.add(i)
        else:
            out.rows[i] = {**rows[i], "response": text}
    out.rows = [r for i, r in enumerate(out.rows) if i not in drop]
    return out


def model_generate(cfg, max_new_tokens: int):
    """A generate_fn over the teacher model of cfg.data.teacher, plus its tokenizer, loaded once."""
    from align import models
    from align.generation import chat_generate, scope_conversations

    name = cfg.data.teacher
    path = None if name == "base" else models.resolve(name)
    try:
        tokenizer = models.load_tokenizer(cfg.model) if path is None else _tokenizer(path, cfg)
        model = models.load_model(cfg.model, cfg.peft, tokenizer=tokenizer, path=path)
    except OSError as e:
        raise AlignError(f"data.teacher: could not load {name!r} ({e})") from None
    system = " ".join(filter(None, [cfg.scope.system_prompt, BRIEF]))

    def generate(prompts: list[str]) -> list[str]:
        texts, stats = chat_generate(model, tokenizer, scope_conversations(system, prompts),
                                     max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size,
                                     batch_tokens=cfg.eval.batch_tokens, desc="teacher answers",
                                     cpu_bf16=models.cpu_autocast(cfg.model, cfg.peft))
        log.info("data.teacher: %d answers at %.1f tokens/s", len(texts), stats["tokens_per_second"])
        return texts

    return generate, tokenizer


def _tokenizer(path, cfg):
    from omegaconf import OmegaConf

    from align import models

    return models.load_tokenizer(OmegaConf.merge(cfg.model, {"name_or_path": str(path), "chat_template": None}))


def teach_sources(cfg, srcs: list, rows: dict, stats: dict) -> None:
    """data.teacher answers the in-scope training rows that came without an answer (a step of recipes.build; rows and
    stats of every loaded source by name)."""
    from align.evaluation.judges import REFUSED, make_judge

    todo = [s for s in srcs if s.split == "train" and s.kind == "safety"
            and any(needs_answer(r) for r in rows[s.name])]
    if not todo:
        return
    budget = int(cfg.data.teacher_max_new_tokens)
    generate, tokenizer = model_generate(cfg, budget)
    judge = make_judge("keyword", refusal_openers=scope_mod.refusal_openers(cfg.scope))

    def refused(prompt, answer):
        return judge.judge([prompt], [answer])[0] == REFUSED

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for src in todo:
        taught = teach(rows[src.name], generate, count, refused, budget)
        rows[src.name] = taught.rows
        stats[src.name]["dropped"].update(teacher_refused=taught.refused, teacher_cut=taught.cut)
        log.info("data.teacher: source '%s': %d answered, %d refusals and %d cut answers dropped", src.name,
                 sum(1 for r in taught.rows if r.get("response")), taught.refused, taught.cut)
