"""The canonical row formats: valid rows pass, each kind of mistake fails with a short reason."""

import pytest

from align.data.formats import prompt_text, response_text, validate

SYS = {"role": "system", "content": "You are helpful."}
USER = {"role": "user", "content": "Hi"}
BOT = {"role": "assistant", "content": "Hello!"}

VALID = {
    "sft": {"messages": [SYS, USER, BOT]},
    "preference": {"prompt": [USER], "chosen": [BOT], "rejected": [{"role": "assistant", "content": "Go away."}]},
    "prompt": {"prompt": [SYS, USER]},
    "safety": {"prompt": "How do I file?", "response": None, "label": "safe", "categories": ["tax/filing"]},
    "scope_eval": {"prompt": "Bake a cake?", "expected": "refuse", "category": "off_scope/cooking", "attack": None},
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_rows_pass(kind):
    validate(VALID[kind], kind)
    validate({**VALID[kind], "id": 7, "source": "mine"}, kind)  # provenance keys are allowed


def reason(row, kind):
    with pytest.raises(ValueError) as exc:
        validate(row, kind)
    return str(exc.value)


def test_missing_and_unknown_keys():
    assert reason({}, "sft") == "missing key 'messages'"
    assert "unknown key 'mesages'" in reason({"messages": [USER, BOT], "mesages": []}, "sft")
    assert "unknown key 'system'" in reason({**VALID["safety"], "system": "x"}, "safety")
    validate({**VALID["scope_eval"], "system": "You are an airline bot."}, "scope_eval")


def test_message_errors():
    bot = {"role": "bot", "content": "x"}
    assert reason({"messages": [SYS, USER, bot]}, "sft") == \
        "messages[2].role must be one of system, user, assistant, got 'bot'"
    assert reason({"messages": [USER, {"role": "assistant", "content": 3}]}, "sft") == \
        "messages[1].content must be a string, got int"
    assert reason({"messages": [USER, {"role": "assistant", "content": "  "}]}, "sft") == "messages[1].content is empty"
    assert reason({"messages": [USER, BOT, SYS, USER, BOT]}, "sft") == \
        "messages[2]: a system message may only come first"
    assert "unknown key 'name'" in reason({"messages": [USER, {**BOT, "name": "x"}]}, "sft")
    assert reason({"messages": []}, "sft") == "messages must be a non-empty list of messages"


def test_sft_structure():
    assert reason({"messages": [USER]}, "sft") == "messages must end with an assistant turn, last is 'user'"
    assert reason({"messages": [USER, BOT, USER]}, "sft").startswith("messages must end with an assistant turn")
    assert "starts with the user" in reason({"messages": [BOT]}, "sft")
    validate({"messages": [USER, BOT, USER, BOT]}, "sft")  # multi-turn is fine


def test_preference_structure():
    ok = VALID["preference"]
    assert reason({**ok, "prompt": [USER, BOT]}, "preference") == \
        "prompt must end with a user turn, last is 'assistant'"
    assert reason({**ok, "chosen": [USER]}, "preference") == "chosen[0].role must be 'assistant', got 'user'"
    assert reason({**ok, "rejected": ok["chosen"]}, "preference") == "chosen and rejected are identical"
    assert reason({**ok, "chosen": "Hello!"}, "preference") == "chosen must be a non-empty list of messages"


def test_prompt_rows():
    assert reason({"prompt": [USER, BOT]}, "prompt") == "prompt must end with a user turn, last is 'assistant'"
    assert reason({"prompt": "Hi"}, "prompt") == "prompt must be a non-empty list of messages"
    validate({"prompt": [USER], "expected": "refuse"}, "prompt")
    assert reason({"prompt": [USER], "expected": "decline"}, "prompt") == \
        "expected must be one of answer, refuse, got 'decline'"


def test_safety_rows():
    ok = VALID["safety"]
    validate({k: v for k, v in ok.items() if k != "response"}, "safety")  # response may be omitted
    assert reason({**ok, "label": "harmful"}, "safety") == "label must be one of safe, unsafe, got 'harmful'"
    assert reason({**ok, "categories": "tax"}, "safety") == "categories must be a list of non-empty strings"
    assert reason({**ok, "response": 5}, "safety") == "response must be a string, got int"
    assert reason({**ok, "prompt": ""}, "safety") == "prompt is empty"


def test_scope_eval_rows():
    ok = VALID["scope_eval"]
    assert reason({**ok, "expected": "comply"}, "scope_eval") == "expected must be one of answer, refuse, got 'comply'"
    assert reason({**ok, "attack": 1}, "scope_eval") == "attack must be a string or null, got int"
    assert reason({k: v for k, v in ok.items() if k != "category"}, "scope_eval") == "missing key 'category'"


def test_not_an_object_and_unknown_kind():
    assert reason(["messages"], "sft") == "expected a JSON object, got list"
    assert "unknown row kind" in reason({}, "chat")


def test_text_views():
    more = [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "Sure."}]
    row = {"messages": [SYS, USER, BOT, *more]}
    assert prompt_text(row, "sft") == "Hi\nHello!\nMore?"  # the context, without the system prompt
    assert response_text(row, "sft") == "Sure."
    assert prompt_text(VALID["preference"], "preference") == "Hi"
    assert response_text(VALID["preference"], "preference") == "Hello!"
    assert response_text(VALID["scope_eval"], "scope_eval") is None
