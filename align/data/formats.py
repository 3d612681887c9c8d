"""The canonical row formats (see data_recipes/README.md) and their validation.

`validate(row, kind)` raises ValueError with a short reason; the loaders turn it into an AlignError
that names the file and line. Extra keys are an error unless listed in EXTRA_KEYS for the kind: a
typo such as "mesages" or "respones" must not pass silently as an unused column.
"""

import re
KINDS = ("sft", "preference", "prompt", "safety", "scope_eval")
ROLES = ("system", "user", "assistant")
LABELS = ("safe", "unsafe")
EXPECTED = ("answer", "refuse")

# optional keys each kind may carry besides its own (id/source are kept for provenance only;
# `system` lets a scope-eval prompt carry its own system prompt, e.g. from the off_topic dataset;
# `refuse` marks which side of the scope a built preference pair's prompt is on, for on-policy negatives;
# `expected` on a prompt row is the behaviour it asks for, for PPO's rule reward)
EXTRA_KEYS = {
    "sft": ("id", "source"),
    "preference": ("id", "source", "refuse"),
    "prompt": ("id", "source", "expected"),
    "safety": ("id", "source"),
    "scope_eval": ("id", "source", "system"),
}
REQUIRED = {
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "safety": ("prompt", "label", "categories"),
    "scope_eval": ("prompt", "expected", "category"),
}
OPTIONAL = {"safety": ("response",), "scope_eval": ("attack",)}


def validate(row, kind: str) -> None:
    """Raise ValueError("<short reason>") unless `row` is a valid canonical row of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED[kind]:
        if key not in row:
            raise ValueError(f"missing key {key!r}")
    allowed = set(REQUIRED[kind]) | set(OPTIONAL.get(kind, ())) | set(EXTRA_KEYS[kind])
    for key in row:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r} for a {kind} row (allowed: {', '.join(sorted(allowed))})")
    if row.get("id") is not None and not isinstance(row["id"], (str, int)):
        raise ValueError("id must be a string or an integer")
    for key in ("source", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{key} must be a string")
    if row.get("refuse") is not None and not isinstance(row["refuse"], bool):
        raise ValueError("refuse must be true or false")
    _CHECKS[kind](row)


def _messages(msgs, name: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{name} must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with role and content")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{where} is missing {key!r}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ValueError(f"{where} has unknown key {extra[0]!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}.content must be a string, got {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ValueError(f"{where}.content is empty")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"{where}: a system message may only come first")


def _conversation(msgs, name: str) -> None:
    """A prompt-side conversation: optional system message, then starts with a user turn."""
    _messages(msgs, name)
    first = 1 if msgs[0]["role"] == "system" else 0
    if len(msgs) <= first:
        raise ValueError(f"{name} has only a system message")
    if msgs[first]["role"] != "user":
        raise ValueError(f"{name}[{first}].role must be 'user' (the conversation starts with the user)")


def _check_sft(row) -> None:
    msgs = row["messages"]
    _conversation(msgs, "messages")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"messages must end with an assistant turn, last is {msgs[-1]['role']!r}")


def _check_prompt_list(msgs, name: str) -> None:
    _conversation(msgs, name)
    if msgs[-1]["role"] != "user":
        raise ValueError(f"{name} must end with a user turn, last is {msgs[-1]['role']!r}")


def _check_completion(msgs, name: str) -> None:
    _messages(msgs, name)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise ValueError(f"{name}[{i}].role must be 'assistant', got {m['role']!r}")


def _check_preference(row) -> None:
    _check_prompt_list(row["prompt"], "prompt")
    _check_completion(row["chosen"], "chosen")
    _check_completion(row["rejected"], "rejected")
    if row["chosen"] == row["rejected"]:
        raise ValueError("chosen and rejected are identical")


def _check_expected(row) -> None:
    if row["expected"] not in EXPECTED:
        raise ValueError(f"expected must be one of {', '.join(EXPECTED)}, got {row['expected']!r}")


def _check_prompt(row) -> None:
    _check_prompt_list(row["prompt"], "prompt")
    if "expected" in row:
        _check_expected(row)


def _text(row, key: str) -> None:
    if not isinstance(row[key], str):
        raise ValueError(f"{key} must be a string, got {type(row[key]).__name__}")
    if not row[key].strip():
        raise ValueError(f"{key} is empty")


def _check_safety(row) -> None:
    _text(row, "prompt")
    response = row.get("response")
    if response is not None:
        _text(row, "response")
    if row["label"] not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {row['label']!r}")
    cats = row["categories"]
    if not isinstance(cats, list) or not all(isinstance(c, str) and c.strip() for c in cats):
        raise ValueError("categories must be a list of non-empty strings")


def _check_scope_eval(row) -> None:
    _text(row, "prompt")
    _check_expected(row)
    _text(row, "category")
    attack = row.get("attack")
    if attack is not None and not isinstance(attack, str):
        raise ValueError(f"attack must be a string or null, got {type(attack).__name__}")


_CHECKS = {
    "sft": _check_sft,
    "preference": _check_preference,
    "prompt": _check_prompt,
    "safety": _check_safety,
    "scope_eval": _check_scope_eval,
}


# --- text views used by filters (length, dedup, style, diversity) -------------------------------

def prompt_text(row: dict, kind: str) -> str:
    """The request a row answers: the conversation before the final answer, without the system
    prompt (a multi-turn "what else?" is not a duplicate of another conversation's "what else?")."""
    if kind == "sft":
        msgs = row["messages"]
        last_assistant = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs = msgs[:last_assistant]
    elif kind in ("preference", "prompt"):
        msgs = row["prompt"]
    else:
        return row["prompt"]
    return "\n".join(m["content"] for m in msgs if m["role"] != "system")


def response_text(row: dict, kind: str):
    """The answer a row teaches (None when the row has none): last assistant turn, chosen, response."""
    if kind == "sft":
        return row["messages"][-1]["content"]
    if kind == "preference":
        return row["chosen"][-1]["content"]
    if kind == "safety":
        return row.get("response")
    return None


def category_of(row: dict, kind: str):
    if kind == "safety":
        return row["categories"][0] if row["categories"] else None
    if kind == "scope_eval":
        return row["category"]
    return None


def slug(name: str) -> str:
    """'Criminal Planning/Confessions' -> 'criminal_planning_confessions' (category names from public sets)."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "other"
