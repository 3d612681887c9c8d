"""The length budget: how much of each source's SFT answers the SFT stage's `trainer.max_length` cuts off.

A system prompt plus the chat template take about 40 tokens of the main job's 80, so a long answer is trained on
its first sentence only; the data stage prints this table so nobody finds out after training.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass

log = logging.getLogger(__name__)

WARN_LOST = 0.25  # warn when a source loses more than this share of its answer tokens


@dataclass
class Budget:
    source: str
    rows: int = 0
    cut: int = 0             # rows whose answer is (partly) cut
    answer_tokens: int = 0   # answer tokens before the cut
    lost_tokens: int = 0     # answer tokens past max_length

    @property
    def lost_share(self) -> float:
        return self.lost_tokens / self.answer_tokens if self.answer_tokens else 0.0


def _lengths(messages: list, tokenizer) -> tuple[int, int]:
    """(tokens before the last answer, tokens of the whole conversation), as the SFT stage renders them."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    count = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    return len(tokenizer(head, add_special_tokens=False)["input_ids"]), count


def measure(sft_rows: list, tokenizer, max_length: int) -> list[Budget]:
    """Per source: rows, rows cut, answer tokens and how many fall past max_length."""
    out: dict[str, Budget] = {}
    for row in sft_rows:
        msgs = row["messages"]
        if msgs[-1]["role"] != "assistant":
            continue
        b = out.setdefault(row.get("source") or "rows", Budget(row.get("source") or "rows"))
        head, total = _lengths(msgs, tokenizer)
        answer = max(0, total - head)
        lost = min(answer, max(0, total - max_length))
        b.rows += 1
        b.cut += lost > 0
        b.answer_tokens += answer
        b.lost_tokens += lost
    return list(out.values())


def table(budgets: list[Budget], max_length: int) -> str:
    lines = [f"length budget: SFT trainer.max_length={max_length} tokens (system prompt and chat template included)",
             f"{'source':<24} {'rows':>6} {'cut':>6} {'answer tokens lost':>19}"]
    for b in budgets:
        lines.append(f"{b.source:<24} {b.rows:>6} {b.cut:>6} {b.lost_share:>18.1%}")
    return "\n".join(lines)


def warn(budgets: list[Budget], max_length: int) -> str | None:
    """One warning line naming the sources that lose more than WARN_LOST of their answer tokens (worst first)."""
    over = sorted((b for b in budgets if b.lost_share > WARN_LOST), key=lambda b: -b.lost_share)
    if not over:
        return None
    names = ", ".join(f"{b.source} {b.lost_share:.0%}" for b in over)
    line = (f"length budget: {len(over)} of {len(budgets)} sources lose more than {WARN_LOST:.0%} of their answer "
            f"tokens past the SFT trainer.max_length={max_length} ({names}); shorten those answers or raise it for "
            f"sft ('pipeline.overrides.sft=[trainer.max_length=N]', or trainer.max_length=N with stage=sft)")
    log.warning(line)
    return line


def summary(budgets: list[Budget]) -> dict:
    by = defaultdict(float)
    for b in budgets:
        by["budget/rows_cut"] += b.cut
        by["budget/answer_tokens"] += b.answer_tokens
        by["budget/answer_tokens_lost"] += b.lost_tokens
    return dict(by)
