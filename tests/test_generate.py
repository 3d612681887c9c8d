"""stage=generate: several adapters on one base, switched per request, each giving its own outputs."""

import json

import pytest
import torch

from conftest import SFT_ARGS, TINY, compose, run_stage

from align import AlignError


def test_switching_adapters_matches_each_adapter_alone(tmp_path):
    for name, lr in (("a", "3e-3"), ("b", "1e-4")):
        run_stage(tmp_path, *SFT_ARGS, f"run.name={name}", "trainer.max_steps=6", f"trainer.learning_rate={lr}",
                  f"seed={len(name) + (lr == '1e-4')}", "data.max_rows=4", "trainer.per_device_train_batch_size=2")
    paths = {}
    for n in ("a", "b"):  # adapters are named after their stage folder
        (tmp_path / "ad" / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n / "sft" / "adapter").rename(tmp_path / "ad" / n)
        paths[n] = tmp_path / "ad" / n
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is a W-2?\nHow do refunds work?\n")
    m = run_stage(tmp_path, "stage=generate", *TINY, "scope=none", "run.name=g", "generate.max_new_tokens=8",
                  f"generate.adapters=[{paths['a']},{paths['b']}]", f"generate.prompts_file={prompts}")
    assert m["adapters"] == ["a", "b"]
    rows = [json.loads(x) for x in (tmp_path / "g" / "generate" / "generations.jsonl").read_text().splitlines()]
    switched = {(r["adapter"], r["prompt"]): r["response"] for r in rows}

    from peft import PeftModel

    from align import models
    from align.stages.generate import answer

    from align.stages.generate import load_adapters

    cfg = compose(tmp_path, *TINY, "scope=none", "generate.max_new_tokens=8")
    tok = models.load_tokenizer(cfg.model)
    shared = load_adapters(models.load_model(cfg.model, cfg.peft, "causal", tok), paths)
    ids = tok("How do refunds work?", return_tensors="pt").input_ids
    logits = {}
    for name, path in paths.items():
        alone = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.peft, "causal", tok), str(path))
        texts = answer(alone, tok, cfg, ["What is a W-2?", "How do refunds work?"], None)
        assert texts == [switched[(name, "What is a W-2?")], switched[(name, "How do refunds work?")]]
        shared.set_adapter(name)
        with torch.no_grad():
            logits[name] = shared(ids).logits
            assert torch.allclose(logits[name], alone(ids).logits, atol=1e-5)
    assert not torch.allclose(logits["a"], logits["b"], atol=1e-3)  # the switch really changes the model


def test_no_prompts_is_a_clear_error(tmp_path):
    with pytest.raises(AlignError, match="no prompts"):
        run_stage(tmp_path, "stage=generate", *TINY, "scope=none", "run.name=g")


def test_refusal_openers_are_suppressed_only_at_the_first_token(tmp_path):
    """On-policy negatives: how the policy answers when it may not open with a refusal."""
    from align import models
    from align.generation import chat_generate
    from align.negatives import refusal_openers

    cfg = compose(tmp_path, *TINY, "scope=tax_assistant")
    tok = models.load_tokenizer(cfg.model)
    assert refusal_openers(cfg.scope, tok) == tok("Sorry", add_special_tokens=False)["input_ids"][:1]
    model = models.load_model(cfg.model, cfg.peft, "causal", tok)
    convs = [[{"role": "user", "content": "What is a W-2?"}]]
    text = tok.apply_chat_template(convs[0], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        first = int(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1].argmax())
    plain, _ = chat_generate(model, tok, convs, max_new_tokens=4)
    held, _ = chat_generate(model, tok, convs, max_new_tokens=4, begin_suppress_tokens=[first])
    assert held[0] != plain[0]  # greedy: the same prompt differs only because its top first token was barred
    with_first, _ = chat_generate(model, tok, convs, max_new_tokens=4, begin_suppress_tokens=[first + 1])
    assert with_first == plain  # barring a token greedy would not pick changes nothing


def test_length_batches_keep_long_prompts_in_small_batches():
    from align.generation import length_batches

    lengths = [10, 600, 12, 11, 580, 9, 590, 13]
    assert length_batches(lengths, 64) == [[5, 0, 3, 2, 7, 4, 6, 1]]  # shortest first, one batch without a budget
    batches = length_batches(lengths, 3, batch_tokens=1200)
    # 3 rows at most, and rows x the longest row within 1200: the 580 and 590 pair (1180), the 600 alone
    assert batches == [[5, 0, 3], [2, 7], [4, 6], [1]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every prompt exactly once
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 1200 or len(b) == 1
