"""Dataset formats: converters from a public dataset's exact columns to canonical rows (formats.py).

A source's `format:` names one entry of FORMATS (null: the file already holds canonical rows); sources.py reads the
records and runs them through it. Not to be confused with formats.py, which defines and validates the canonical
rows every converter makes.
"""

import re
from dataclasses import dataclass
from typing import Callable

from align import AlignError
from align.data.formats import slug

# --- helpers for the converters -----------------------------------------------------------------

def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": str(content).strip()}


def _nonempty(*texts) -> bool:
    return all(isinstance(t, str) and t.strip() for t in texts)


# --- converters: public dataset rows -> canonical rows --------------------------------------------
# Each takes (record, kind, options) and returns a list of canonical rows ([] = unmapped by design).
# A missing column raises KeyError, which the loader reports as a bad row.

def gair_lima(rec, kind, opts):
    """GAIR/lima: `conversations` (alternating user/assistant strings, user first), `source`."""
    turns = [_msg("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(rec["conversations"])]
    origin = f"lima/{rec['source']}" if rec.get("source") else None
    return _chat_rows(turns, kind, origin)


def h4_lima(rec, kind, opts):
    """HuggingFaceH4/lima: `messages` [{role, content}], `prompt_id`, `prompt`, `meta`."""
    turns = [_msg(m["role"], m["content"]) for m in rec["messages"]]
    return _chat_rows(turns, kind, None, rec.get("prompt_id"))


def _chat_rows(turns, kind, origin=None, row_id=None):
    extra = {k: v for k, v in (("id", row_id), ("source", origin)) if v}
    if kind == "sft":
        while turns and turns[-1]["role"] != "assistant":
            turns = turns[:-1]  # GAIR/lima's test split and some dialogs end with a user turn
        return [{"messages": turns, **extra}] if turns else []
    while turns and turns[-1]["role"] != "user":
        turns = turns[:-1]
    return [{"prompt": turns, **extra}] if turns else []


HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _parse_hh(text: str) -> list:
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("transcript does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [_msg(roles[parts[i]], parts[i + 1]) for i in range(1, len(parts), 2)]


def hh_rlhf(rec, kind, opts):
    """Anthropic/hh-rlhf: `chosen`/`rejected` full transcripts; the last Assistant turn is the answer."""
    marker = "\n\nAssistant:"
    chosen, rejected = rec["chosen"], rec["rejected"]
    ic, ir = chosen.rfind(marker), rejected.rfind(marker)
    if ic < 0 or ir < 0:
        raise ValueError("transcript has no '\\n\\nAssistant:' turn")
    prefix, answer_c, answer_r = chosen[:ic], chosen[ic + len(marker):].strip(), rejected[ir + len(marker):].strip()
    prompt = _parse_hh(prefix)
    # known quirks of the dataset: different histories, empty or identical answers, empty turns
    if rejected[:ir] != prefix or not answer_c or not answer_r or answer_c == answer_r:
        return []
    if not prompt or prompt[-1]["role"] != "user" or not all(m["content"] for m in prompt):
        return []
    if kind == "preference":
        return [{"prompt": prompt, "chosen": [_msg("assistant", answer_c)],
                 "rejected": [_msg("assistant", answer_r)]}]
    if kind == "sft":
        return [{"messages": prompt + [_msg("assistant", answer_c)]}]
    return [{"prompt": prompt}]


def pku_saferlhf(rec, kind, opts):
    """PKU-Alignment/PKU-SafeRLHF: prompt, response_0/1, is_response_0/1_safe, better/safer_response_id."""
    mode = opts.get("preference", "safer")
    if mode not in ("safer", "better"):
        raise AlignError(f"pku_saferlhf: option preference must be safer or better, got {mode!r}")
    best = int(rec[f"{mode}_response_id"])
    chosen, rejected = rec[f"response_{best}"], rec[f"response_{1 - best}"]
    # preferring the lesser of two harmful answers teaches harm: by default the chosen must be safe
    if mode == "safer" and opts.get("require_safe_chosen", True) and not _truthy(rec[f"is_response_{best}_safe"]):
        return []
    if not _nonempty(rec["prompt"], chosen, rejected) or chosen.strip() == rejected.strip():
        return []
    return [{"prompt": [_msg("user", rec["prompt"])], "chosen": [_msg("assistant", chosen)],
             "rejected": [_msg("assistant", rejected)]}]


def beavertails(rec, kind, opts):
    """PKU-Alignment/BeaverTails: prompt, response, category {14 harm names: bool}, is_safe (of the QA pair)."""
    safe = _truthy(rec["is_safe"])
    cats = sorted(f"unsafe/{slug(name)}" for name, on in (rec["category"] or {}).items() if _truthy(on))
    if not safe and not cats:
        cats = ["unsafe/other"]
    response = rec.get("response") if _nonempty(rec.get("response")) else None
    return [{"prompt": rec["prompt"], "response": response, "label": "safe" if safe else "unsafe",
             "categories": cats if not safe else ["general"]}]


def aegis2(rec, kind, opts):
    """nvidia/Aegis-AI-Content-Safety-Dataset-2.0: prompt, response, prompt_label, response_label,
    violated_categories (comma-separated), reconstruction_id_if_redacted, *_label_source."""
    prompt = rec["prompt"]
    if not _nonempty(prompt) or prompt.strip() == "REDACTED":
        return []  # redacted prompts must be reconstructed from their source (reconstruction_id_if_redacted)
    label = rec["prompt_label"]
    if label not in ("safe", "unsafe"):
        raise ValueError(f"prompt_label must be safe or unsafe, got {label!r}")
    cats = [f"unsafe/{slug(c)}" for c in (rec.get("violated_categories") or "").split(",") if c.strip()]
    cats = (cats or ["unsafe/other"]) if label == "unsafe" else ["general"]
    if kind == "scope_eval":
        return [{"prompt": prompt, "expected": "refuse" if label == "unsafe" else "answer",
                 "category": cats[0], "attack": None, "id": rec.get("id")}]
    # a response is kept when it matches the prompt: a safe answer to a safe prompt, or a harmful
    # compliance to an unsafe prompt (usable as a DPO rejected, never as a target)
    response = rec.get("response")
    keep = _nonempty(response) and rec.get("response_label") == label
    return [{"prompt": prompt, "response": response if keep else None, "label": label, "categories": cats,
             "id": rec.get("id")}]


def wildguardmix(rec, kind, opts):
    """allenai/wildguardmix: prompt, adversarial, response, prompt_harm_label, response_refusal_label,
    response_harm_label, subcategory."""
    harm = rec["prompt_harm_label"]
    if harm not in ("harmful", "unharmful"):
        return []  # a few rows carry no prompt label
    unsafe = harm == "harmful"
    category = f"unsafe/{slug(rec.get('subcategory') or 'other')}" if unsafe else "general"
    adversarial = _truthy(rec.get("adversarial"))
    if kind == "scope_eval":
        return [{"prompt": rec["prompt"], "expected": "refuse" if unsafe else "answer", "category": category,
                 "attack": "adversarial" if adversarial else None}]
    response = rec.get("response")
    complied = rec.get("response_refusal_label") == "compliance"
    # benign prompt: keep a harmless compliant answer; harmful prompt: keep a compliance (a rejected)
    keep = _nonempty(response) and complied and (unsafe or rec.get("response_harm_label") == "unharmful")
    cats = [category] + (["attack/adversarial"] if adversarial else [])
    return [{"prompt": rec["prompt"], "response": response if keep else None,
             "label": "unsafe" if unsafe else "safe", "categories": cats}]


def xstest(rec, kind, opts):
    """XSTest (paul-rottger/xstest, xstest_prompts.csv): id, prompt, type, label, focus, note."""
    safe = rec["label"] == "safe"
    if rec["label"] not in ("safe", "unsafe"):
        raise ValueError(f"label must be safe or unsafe, got {rec['label']!r}")
    category = f"xstest/{slug(rec['type'])}" if safe else f"unsafe/{slug(rec['type'])}"
    row_id = str(rec["id"]) if rec.get("id") is not None else None
    if kind == "safety":
        return [{"prompt": rec["prompt"], "response": None, "label": rec["label"], "categories": [category]}]
    out = {"prompt": rec["prompt"], "expected": "answer" if safe else "refuse", "category": category, "attack": None}
    return [{**out, "id": row_id} if row_id else out]


def off_topic(rec, kind, opts):
    """gabrielchua/off-topic: system_prompt, prompt, off_topic (1 = off-topic for that system prompt)."""
    off = int(rec["off_topic"]) == 1
    row = {"prompt": rec["prompt"], "expected": "refuse" if off else "answer",
           "category": "off_scope/off_topic" if off else "in_scope/on_topic", "attack": None}
    if _nonempty(rec.get("system_prompt")):
        row["system"] = rec["system_prompt"]
    return [row]


ROLE_ALIASES = {"user": "user", "assistant": "assistant", "bot": "assistant", "human": "user", "system": "system"}


def cant_talk_about_this(rec, kind, opts):
    """nvidia/CantTalkAboutThis-Topic-Control-Dataset: domain, scenario, system_instruction, conversation,
    distractors [{"distractor", "bot turn"}], conversation_with_distractors.

    conversation_with_distractors is read as a list of conversation blocks (each a list of
    {role, content} turns) or as one flat list of turns. A distractor turn is a user turn whose text
    equals one of `distractors[].distractor`. mode=full (default): one row per block, trimmed to end
    with the assistant; mode=redirects: one row per distractor, ending with the assistant's redirect.
    """
    mode = opts.get("mode", "full")
    if mode not in ("full", "redirects"):
        raise AlignError(f"cant_talk_about_this: option mode must be full or redirects, got {mode!r}")
    conv = rec["conversation_with_distractors"]
    blocks = conv if conv and isinstance(conv[0], list) else [conv]
    distractors = {d["distractor"].strip() for d in rec.get("distractors") or [] if d.get("distractor")}
    system = [_msg("system", rec["system_instruction"])] if _nonempty(rec.get("system_instruction")) else []
    rows, seen = [], []
    for block in blocks:
        turns = [_msg(ROLE_ALIASES[t["role"].lower()], t["content"]) for t in block]
        if mode == "redirects":
            ends = [i + 2 for i, t in enumerate(turns[:-1])
                    if t["role"] == "user" and t["content"] in distractors and turns[i + 1]["role"] == "assistant"]
        else:
            ends = [max((i + 1 for i, t in enumerate(turns) if t["role"] == "assistant"), default=0)]
        for end in ends:
            msgs = system + turns[:end]
            if end and msgs not in seen:
                seen.append(msgs)
                rows.append({"messages": msgs})
    return rows


@dataclass(frozen=True)
class Format:
    """One dataset format: its converter, the row kinds it makes, and the source options it reads."""
    fn: Callable
    kinds: tuple
    options: tuple = ()


FORMATS = {
    "gair_lima": Format(gair_lima, ("sft", "prompt")),
    "h4_lima": Format(h4_lima, ("sft", "prompt")),
    "hh_rlhf": Format(hh_rlhf, ("preference", "sft", "prompt")),
    "pku_saferlhf": Format(pku_saferlhf, ("preference",), ("preference", "require_safe_chosen")),
    "beavertails": Format(beavertails, ("safety",)),
    "aegis2": Format(aegis2, ("safety", "scope_eval")),
    "wildguardmix": Format(wildguardmix, ("safety", "scope_eval")),
    "xstest": Format(xstest, ("scope_eval", "safety")),
    "off_topic": Format(off_topic, ("scope_eval",)),
    "cant_talk_about_this": Format(cant_talk_about_this, ("sft",), ("mode",)),
}
