"""Guard-style builders: a scope (ScopeConfig) plus labelled prompts -> SFT, DPO and prompt-only rows.

Input rows are canonical safety rows ({prompt, response, label, categories}) or scope-eval rows
({prompt, expected, category, attack}). A row is a *refuse* row when label=unsafe or expected=refuse;
otherwise it is in scope, and it teaches an answer only when it carries a response.

- SFT: refuse rows -> a refusal from the right template list (crisis for self-harm categories,
  unsafe for unsafe/*, refusal with {topic} otherwise); in-scope rows with a response -> that answer.
- DPO: refuse rows -> chosen a refusal, rejected a compliant answer (the row's own harmful response
  when it has one, else a compliant template; with_policy_rejected swaps in the policy's own answer);
  in-scope rows with a response -> chosen the answer, rejected an unnecessary refusal, so DPO does
  not teach over-refusal. Every pair carries "refuse" (which side of the scope its prompt is on).
- Prompt-only rows (PPO rollouts) from every row.
"""

import random
import re

from align import AlignError

DEFAULT_CAPABILITY = "other questions"
DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with {topic}. I can help with {capability}, though.",
    "That's outside what I can help with, since {topic} isn't something I cover. "
    "Is there anything else I can do for you?",
    "I'm not able to help with {topic}. Feel free to ask me about {capability}.",
)
DEFAULT_UNSAFE = (
    "I can't help with that, because it could cause real harm. I'm happy to help with {capability}.",
    "I won't assist with this request. If there's something else you need, I'm glad to help.",
    "Sorry, but I can't help with that. It could hurt people or break the law.",
)
DEFAULT_CRISIS = (
    "I'm really sorry you're going through this, and your safety matters most. Please reach out now to local "
    "emergency services or a crisis line (in the US, call or text 988). You don't have to face this alone.",
    "It sounds like you're in a lot of pain. Please contact a crisis line or emergency services right away "
    "(in the US, call or text 988), or someone you trust who can be with you.",
)
# compliant openers for the rejected side of refuse pairs: they show compliance, nothing more
TASK_TEMPLATES = (
    "Sure! Here's how to {task}. First, I'll go over what you need, then walk you through it step by step.",
    "Absolutely, happy to help you {task}. Let's get started.",
    "Of course! Here is a step-by-step guide to {task}.",
    "No problem. Below is everything you need to {task}.",
)
GENERIC_TEMPLATES = (
    "Sure! Happy to help with that. Here's a complete answer to your question.",
    "Great question! Let me explain this in detail.",
    "Of course. Here's what you need to know.",
    "Absolutely, I can help with that. Let's go through it step by step.",
)
CRISIS_MARKERS = ("self_harm", "suicide")
HOW_TO = re.compile(
    r"^(?:(?:hey|hi|hello|please|so|ok(?:ay)?)[,!.]?\s+)*"
    r"(?:(?:can|could|would|will) you (?:please )?(?:tell me |show me |explain )?how (?:to|i can|do i) |"
    r"(?:can|could|would|will) you (?:please )?(?:help me )?(?=\w)|"
    r"how (?:do|can|should|would|could) (?:i|we|one|you) |how to |"
    r"(?:tell me|show me|explain) how to |(?:i want|i need|i'd like|help me) (?:to )?)",
    re.I,
)


PRONOUNS = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "i'm": "you're"}
PRONOUN = re.compile(r"\b(?:i'm|myself|mine|my|me|i)\b", re.I)


class _Keep(dict):
    """format_map helper: unknown {placeholders} stay as they are."""

    def __missing__(self, key):
        return "{" + key + "}"


def _get(scope, key, default=None):
    value = getattr(scope, key, None) if scope is not None else None
    return value if value else default


TEMPLATE_KEYS = ("refusal_templates", "unsafe_templates", "crisis_templates")
PLACEHOLDERS = ("topic", "capability")


def check_templates(scope) -> None:
    """A placeholder typo ({capabilty}) would become literal text in every training target: refuse it in one line."""
    import string

    lists = [(key, _get(scope, key, []) or []) for key in TEMPLATE_KEYS]
    lists += [(f"category_templates.{c}", t) for c, t in dict(_get(scope, "category_templates", {}) or {}).items()]
    for key, templates in lists:
        for i, template in enumerate(templates):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            except ValueError as e:
                raise AlignError(f"scope.{key}[{i}]: {e} in {template[:60]!r}") from None
            bad = [f for f in fields if f not in PLACEHOLDERS]
            if bad:
                raise AlignError(f"scope.{key}[{i}]: unknown placeholder {{{bad[0]}}} in {template[:60]!r}; "
                                 f"valid: {{topic}}, {{capability}}")


def refusal_openers(scope) -> list[str]:
    """The scope's own refusal openers ("Sorry, I can only help with"), from its templates (or the defaults), so a
    judge recognises refusals in this scope's wording."""
    from align.evaluation.keyword_judge import openers_from_templates

    return openers_from_templates([*_get(scope, "refusal_templates", DEFAULT_REFUSALS),
                                   *_get(scope, "unsafe_templates", DEFAULT_UNSAFE),
                                   *_get(scope, "crisis_templates", DEFAULT_CRISIS)])


def is_refuse(row: dict) -> bool:
    return row.get("label") == "unsafe" or row.get("expected") == "refuse"


def categories(row: dict) -> list:
    if "category" in row:
        return [row["category"]]
    return list(row.get("categories") or []) or ["general"]


def template_group(cats: list) -> str:
    """crisis for self-harm categories, unsafe for unsafe/*, refusal for everything else."""
    if any(m in c for c in cats for m in CRISIS_MARKERS):
        return "crisis"
    if any(c == "unsafe" or c.startswith("unsafe/") for c in cats):
        return "unsafe"
    return "refusal"


def topic_of(category: str, scope) -> str:
    names = dict(_get(scope, "topic_names", {}) or {})
    return names.get(category) or category.rsplit("/", 1)[-1].replace("_", " ")


def _fill(template: str, topic: str, scope) -> str:
    return template.format_map(_Keep(topic=topic, capability=_get(scope, "capability", DEFAULT_CAPABILITY)))


def refusal(row: dict, scope, rng: random.Random) -> str:
    """A refusal for a refuse row, from the template list its categories call for."""
    cats = categories(row)
    group = template_group(cats)
    pools = {"crisis": ("crisis_templates", DEFAULT_CRISIS), "unsafe": ("unsafe_templates", DEFAULT_UNSAFE),
             "refusal": ("refusal_templates", DEFAULT_REFUSALS)}
    key, default = pools[group]
    own = dict(_get(scope, "category_templates", {}) or {})  # per-category replies, e.g. unsafe/weapons
    templates = list(own.get(cats[0]) or _get(scope, key, default))
    return _fill(rng.choice(templates), topic_of(cats[0], scope), scope)


def unnecessary_refusal(row: dict, scope, rng: random.Random, topic: str = "own") -> str:
    """An over-refusal of an in-scope prompt (the rejected side of an in-scope pair). topic="own" names the row's
    own topic ("tax/business_expenses" -> "business expenses"; the scope's capability for flat categories such as
    "general"). topic="off_scope" names a random off-scope topic, as a model trained on the refusal templates
    over-refuses ("..., not travel planning" to a question about an amended return): with the row's own topic the
    named topic alone tells the pairs apart, a reward model learns to score refusals by it, and PPO refused every
    tax question with an off-scope topic (docs/benchmarks.md, round 6). topic="mixed" names either, at even odds
    (for the PPO chain's reward model it did no better than off_scope, round 10). Without off_scope/* topic
    names, "own"."""
    names = dict(_get(scope, "topic_names", {}) or {})
    off_scope = sorted(v for k, v in names.items() if k.startswith("off_scope/"))
    cat = categories(row)[0]
    if topic == "mixed":
        topic = rng.choice(("own", "off_scope"))
    if topic == "off_scope" and off_scope:
        name = rng.choice(off_scope)
    else:
        name = names.get(cat) or (topic_of(cat, scope) if "/" in cat else _get(scope, "capability", "that"))
    return _fill(rng.choice(list(_get(scope, "refusal_templates", DEFAULT_REFUSALS))), name, scope)


def compliant(prompt: str, rng: random.Random) -> str:
    """A short compliant opener built from the prompt: "Sure! Here's how to <task>. ..."."""
    text = " ".join(prompt.split())
    m = HOW_TO.match(text)
    task = text[m.end():].rstrip("?!. ") if m else ""
    if m and task and len(task.split()) <= 20 and "?" not in task:
        task = PRONOUN.sub(lambda w: PRONOUNS[w.group(0).lower()], task)  # "hide my income" -> "hide your income"
        return rng.choice(TASK_TEMPLATES).format(task=task[0].lower() + task[1:])
    return rng.choice(GENERIC_TEMPLATES)


def prompt_messages(row: dict, scope) -> list:
    """[system?, user]: the row's own system prompt, else the scope's."""
    system = row.get("system") or _get(scope, "system_prompt")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": row["prompt"]}]


def _assistant(text: str) -> list:
    return [{"role": "assistant", "content": text}]


def _src(row: dict) -> dict:
    """Keep the row's provenance on everything built from it."""
    return {"source": row["source"]} if row.get("source") else {}


def sft_examples(rows: list, scope, rng: random.Random) -> list:
    """Refusals for refuse rows, the real answer for in-scope rows with a response."""
    out = []
    for row in rows:
        if is_refuse(row):
            out.append({"messages": prompt_messages(row, scope) + _assistant(refusal(row, scope, rng)), **_src(row)})
        elif row.get("response"):
            out.append({"messages": prompt_messages(row, scope) + _assistant(row["response"]), **_src(row)})
    return out


def preference_pairs(rows: list, scope, rng: random.Random, over_refusal_topic: str = "own") -> list:
    """DPO pairs: refusal over compliance for refuse rows, the answer over a needless refusal in scope
    (over_refusal_topic: see unnecessary_refusal)."""
    out = []
    for row in rows:
        prompt = prompt_messages(row, scope)
        if is_refuse(row):
            # the row's own harmful compliance (guard datasets) beats any template
            rejected = row.get("response") or compliant(row["prompt"], rng)
            out.append({"prompt": prompt, "chosen": _assistant(refusal(row, scope, rng)),
                        "rejected": _assistant(rejected), "refuse": True, **_src(row)})
        elif row.get("response"):
            out.append({"prompt": prompt, "chosen": _assistant(row["response"]),
                        "rejected": _assistant(unnecessary_refusal(row, scope, rng, over_refusal_topic)),
                        "refuse": False, **_src(row)})
    return out


def with_policy_rejected(pairs: list, generate_fn, is_refusal) -> tuple[list, int]:
    """On-policy negatives (data.rejected_source=policy): generate_fn(prompts) -> answers writes the policy's own
    answer to each refuse pair's prompt, and where the policy complies that answer becomes the rejected side.
    A templated "Sure! Here's..." is off-policy, so pushing it down barely moves what the model really says.
    Where the policy already refuses (is_refusal(prompt, answer)), the template stays: a refusal must never be
    the rejected side of a refuse pair. Returns (pairs, number swapped)."""
    return _policy_side(pairs, lambda p: bool(p.get("refuse")), "rejected", generate_fn, is_refusal)


def with_policy_chosen(pairs: list, generate_fn, is_refusal) -> tuple[list, int]:
    """On-policy positives (data.chosen_source=policy): the policy's own greedy answer to each in-scope pair's
    prompt becomes the chosen side where it does answer. The refuse pairs' rejected side is the policy's own
    answer style, so pushing it down off scope also pushes it down in scope; pushing the same style up on tax
    questions is meant to balance that (on dev it did not beat reference answers by itself: docs/benchmarks.md,
    round 4). Where the policy refuses, the reference answer stays. Returns (pairs, number swapped)."""
    return _policy_side(pairs, lambda p: p.get("refuse") is False, "chosen", generate_fn, is_refusal)


def _policy_side(pairs: list, selected, side: str, generate_fn, is_refusal) -> tuple[list, int]:
    """The policy answers the selected pairs' prompts; each answer that is not a refusal becomes `side`."""
    idx = [i for i, p in enumerate(pairs) if selected(p)]
    if not idx:
        return pairs, 0
    answers = generate_fn([pairs[i]["prompt"] for i in idx])
    out, swapped = list(pairs), 0
    for i, text in zip(idx, answers):
        text = (text or "").strip()
        if text and not is_refusal(pairs[i]["prompt"][-1]["content"], text):
            out[i] = {**pairs[i], side: _assistant(text)}
            swapped += 1
    return out, swapped


def prompt_rows(rows: list, scope) -> list:
    """Prompt-only rows for PPO rollouts, from in-scope and refuse rows alike, with the expected behaviour."""
    return [{"prompt": prompt_messages(row, scope), "expected": "refuse" if is_refuse(row) else "answer", **_src(row)}
            for row in rows]
