"""Reward model and DPO on the tiny model, from the SFT adapter of the same run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PAIR_LENGTH, PREF as COMMON, copy_run, run_stage

from align import AlignError


@pytest.fixture
def sft_run(tax_sft, tmp_path):
    """tmp_path holding a copy of the session's finished tax_assistant SFT stage (run.name=p, COMMON settings)."""
    return copy_run(tax_sft, tmp_path)


def test_rm_trains_evaluates_and_loads(sft_run):
    m = run_stage(sft_run, "stage=rm", *COMMON, "run.name=p", "trainer.max_steps=6", "trainer.learning_rate=1e-3")
    for key in ("eval/accuracy", "eval/ties", "eval/mean_margin", "eval/loss", "eval/n_pairs"):
        assert key in m
    assert m["eval/n_pairs"] == 8  # data.max_rows
    # long in-scope answers are cut to fit max_length, not dropped by TRL (which would leave mostly refusal pairs)
    assert m["data/train_rows_used"] == m["data/train_rows"]
    assert 0.0 <= m["eval/accuracy"] <= 1.0 and m["eval/accuracy"] + m["eval/tie_rate"] <= 1.0 + 1e-9
    manifest = json.loads((sft_run / "p" / "rm" / "manifest.json").read_text())
    assert "sft" in manifest["parents"]

    from peft import AutoPeftModelForSequenceClassification

    rm = AutoPeftModelForSequenceClassification.from_pretrained(str(sft_run / "p" / "rm" / "adapter"), num_labels=1)
    score = rm(torch.tensor([[1, 2, 3, 4]])).logits
    assert score.shape == (1, 1)


def test_fit_pairs_cuts_answers_to_max_length():
    from transformers import AutoTokenizer

    from align.models import resolve
    from align.stages.rm import fit_pairs

    tok = AutoTokenizer.from_pretrained(resolve("align://tiny-llama"))
    prompt = [{"role": "user", "content": "How are tips taxed?"}]
    long = "Tips are taxable income. " * 60
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": long}],
           "rejected": [{"role": "assistant", "content": "Sorry, I can't help."}]}
    (fit,) = fit_pairs([row], tok, 64)
    for side in ("chosen", "rejected"):
        text = tok.apply_chat_template(prompt + fit[side], tokenize=False)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 64
    assert long.startswith(fit["chosen"][0]["content"].strip()) and len(fit["chosen"][0]["content"]) > 40
    assert fit["rejected"] == row["rejected"]  # short answers are left alone


def test_ties_are_counted_and_never_correct(sft_run):
    """Collapsed rewards (every pair a tie) must score 0 accuracy, not look perfect."""
    from peft import AutoPeftModelForSequenceClassification

    from align.data import recipes
    from align.stages.rm import pairwise_eval
    from conftest import compose
    from transformers import AutoTokenizer

    run_stage(sft_run, "stage=rm", *COMMON, "run.name=p", "trainer.max_steps=2")
    path = str(sft_run / "p" / "rm" / "adapter")
    rm = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(path)
    rows = recipes.load(compose(sft_run, *COMMON, "run.name=p"), "preference")[1]
    assert len(rows) == 8
    head = rm.base_model.model.score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.zero_()
    m = pairwise_eval(rm, tok, rows, max_length=128, tie_epsilon=1e-3)
    assert m["eval/ties"] == 8 and m["eval/accuracy"] == 0.0 and m["eval/tie_rate"] == 1.0


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_qlora_rm_and_dpo(sft_run, stage):
    length = [PAIR_LENGTH] if stage == "dpo" else []
    m = run_stage(sft_run, f"stage={stage}", *COMMON, *length, "peft=qlora", "run.name=p", "trainer.max_steps=2",
                  "run.overwrite=true")
    assert m["train/global_step"] == 2


def test_missing_parent_names_the_stage_to_run(tmp_path):
    with pytest.raises(AlignError, match=r"stage=sft run.name=nothing"):
        run_stage(tmp_path, "stage=dpo", *COMMON, "run.name=nothing")
    with pytest.raises(AlignError, match=r"stage=sft run.name=nothing") as err:
        run_stage(tmp_path, "stage=rm", *COMMON, "run.name=nothing")
    assert "\n" not in str(err.value)  # the CLI prints it as its one `error:` line


def test_kto_from_sft_on_unpaired_rows(sft_run):
    m = run_stage(sft_run, "stage=kto", *COMMON, PAIR_LENGTH, "run.name=p", "trainer.max_steps=2")
    assert m["train/global_step"] == 2 and m["data/train_rows_available"] == 16  # 8 pairs -> 16 unpaired rows
    assert m["data/train_rows"] == 4  # 2 steps x batch 2: only those rows get reference log-probs
    assert (sft_run / "p" / "kto" / "adapter" / "adapter_model.safetensors").exists()
    assert not (sft_run / "p" / "kto" / "adapter" / "ref").exists()


def assert_dpo_logs_rewards_and_saves_policy(m: dict, run: Path) -> None:
    """A finished dpo stage logged its rewards (train and eval) and saved the policy alone: no ref/ adapter beside
    it, one adapter when loaded."""
    from peft import AutoPeftModelForCausalLM

    for key in ("train/rewards/accuracies", "train/rewards/margins", "eval_rewards/accuracies",
                "eval_rewards/chosen", "eval_rewards/rejected"):
        assert key in m, sorted(m)
    adapter = run / "p" / "dpo" / "adapter"
    assert not (adapter / "ref").exists()
    policy = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert list(policy.peft_config) == ["default"]


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_on_policy_rejected_answers_come_from_the_model(sft_run, monkeypatch, stage):
    """The stage asks the SFT policy for its answers with the refusal opener barred and keeps the compliant ones
    (for rm too, so PPO's reward model has seen the policy's own off-scope answers). The tiny policy's few tokens
    are noise, so its generator is replaced; test_generate covers the real one (and the stages that keep the
    recipe's data.rejected_source=policy, here test_rm_trains_evaluates_and_loads, run it in a stage).

    The dpo case is also the suite's DPO-from-SFT run (ipo loss): it logs the rewards and saves the policy alone."""
    from align import negatives

    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append(kw)  # every other answer complies, the rest refuse
        texts = ["Sure, here is a long and detailed answer about that topic for you." if i % 2 else
                 "Sorry, I can only help with tax questions." for i in range(len(prompts))]
        return texts, {"tokens_per_second": 1.0}

    monkeypatch.setattr(negatives, "chat_generate", fake_generate)
    dpo = [PAIR_LENGTH, "trainer.learning_rate=1e-3", "dpo.loss_type=ipo"] if stage == "dpo" else []
    m = run_stage(sft_run, f"stage={stage}", *COMMON, "run.name=p", "trainer.max_steps=2", "run.overwrite=true",
                  "data.rejected_source=policy", *dpo)
    assert m["train/global_step"] == 2
    assert calls and calls[0]["begin_suppress_tokens"]  # the scope's refusal opener is barred
    assert m["data/on_policy_rejected"] > 0
    # only the pairs two steps reach are answered (generation is the costly part): 2 x batch 2 of the 8 pairs
    assert m["data/train_rows"] == 4
    if stage == "dpo":
        assert_dpo_logs_rewards_and_saves_policy(m, sft_run)


def test_on_policy_chosen_answers_come_from_the_model(sft_run, monkeypatch):
    """data.chosen_source=policy: the SFT policy answers the in-scope prompts greedily (nothing barred) and its
    answers become the chosen side where they are not refusals."""
    from align import negatives

    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append(kw)
        return ["In the US, that is deductible if you itemize on Schedule A." if i % 2 else
                "Sorry, I can only help with tax questions." for i in range(len(prompts))], {"tokens_per_second": 1.0}

    monkeypatch.setattr(negatives, "chat_generate", fake_generate)
    m = run_stage(sft_run, "stage=dpo", *COMMON, PAIR_LENGTH, "run.name=p", "trainer.max_steps=2",
                  "run.overwrite=true", "data.rejected_source=template",
                  "data.chosen_source=policy")
    assert len(calls) == 1 and not calls[0]["begin_suppress_tokens"]  # only the chosen side was written
    assert m["data/on_policy_chosen"] > 0 and "data/on_policy_rejected" not in m


def test_unknown_chosen_source_is_one_clear_error(sft_run):
    shutil.rmtree(sft_run / "p" / "data")  # the recipe build checks the data options: no finished build to reuse
    with pytest.raises(AlignError, match="data.chosen_source must be reference or policy, got 'own'"):
        run_stage(sft_run, "stage=dpo", *COMMON, "run.name=p", "run.overwrite=true",
                  "data.chosen_source=own")


def test_dpo_loss_weights_must_match_the_loss_types(sft_run):
    with pytest.raises(AlignError, match=r"dpo.loss_weights: 1 weights for 2 loss types"):
        run_stage(sft_run, "stage=dpo", *COMMON, "run.name=p", "dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]")


def test_dpo_interleaves_refuse_and_answer_pairs():
    from align.preference import interleave_refusals

    rows = [{"prompt": f"a{i}", "refuse": False} for i in range(5)] + [{"prompt": f"r{i}", "refuse": True}
                                                                      for i in range(2)]
    out = interleave_refusals(rows)
    assert [r["prompt"] for r in out] == ["a0", "r0", "a1", "r1", "a2", "a3", "a4"]  # nothing dropped
    plain = [{"prompt": "x"}, {"prompt": "y"}]
    assert interleave_refusals(plain) == plain  # data without the mark keeps its order
