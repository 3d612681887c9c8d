"""Full fine-tuning (peft=full) after sft (issue #29): rm, dpo and kto train every weight of the SFT model (a full
SFT's model/, or the base with a LoRA SFT adapter merged in); grpo and ppo refuse in one line. The tiny model, from
the session's tax_assistant SFT runs."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import PAIR_LENGTH, PREF, compose, copy_run, run_stage, shared

from align import AlignError, training

KEY = "model.layers.0.self_attn.q_proj.weight"  # a backbone tensor SFT changes (LoRA targets all linear layers)
STEPS = ["trainer.max_steps=2", "trainer.learning_rate=1e-3"]


def _build_full_sft(tax_sft: Path):
    def build(root: Path) -> None:
        copy_run(tax_sft, root)  # the data build is reused; only sft is trained again, in full
        run_stage(root, "stage=sft", *PREF, "run.name=p", "peft=full", "trainer.max_steps=3",
                  "trainer.learning_rate=1e-3", "run.overwrite=true")
    return build


@pytest.fixture(scope="session")
def full_sft(tmp_path_factory, tax_sft) -> Path:
    return shared(tmp_path_factory, "tax_sft_full", _build_full_sft(tax_sft))


@pytest.fixture
def full_run(full_sft, tmp_path) -> Path:
    """tmp_path with a copy of the data build and a peft=full SFT stage (run.name=p): sft/model, no adapter."""
    return copy_run(full_sft, tmp_path)


@pytest.fixture
def lora_run(tax_sft, tmp_path) -> Path:
    """tmp_path with a copy of the data build and the LoRA SFT stage (run.name=p): sft/adapter."""
    return copy_run(tax_sft, tmp_path)


@pytest.fixture
def at_start(monkeypatch) -> dict:
    """KEY in the policy (and the reference model TRL was given) when training starts: training.fit, wrapped."""
    seen, fit = {}, training.fit

    def spy(trainer, *args, **kwargs):
        seen["model"] = trainer.model.state_dict()[KEY].detach().clone()
        ref = getattr(trainer, "ref_model", None)
        seen["ref"] = None if ref is None else ref.state_dict()[KEY].detach().clone()
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    return seen


def weight(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))[KEY]


def base_weight() -> torch.Tensor:
    from align.models import resolve

    return weight(Path(resolve("align://tiny-llama")))


def merged_weight(adapter: Path) -> torch.Tensor:
    """KEY of the base with the SFT adapter merged in, computed here with peft alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("align://tiny-llama"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()[KEY]


def parent(run: Path, stage: str) -> str:
    return json.loads((run / "p" / stage / "manifest.json").read_text())["parents"]["sft"]["path"]


def test_rm_starts_from_the_full_sft_model(full_run, at_start, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from align import negatives

    asked = []

    def fake_generate(model, tokenizer, prompts, **kw):  # the tiny policy's words are noise: record who was asked
        asked.append((type(model).__name__, model.state_dict()[KEY].detach().clone()))
        return ["Sure, here is a long and detailed answer about that topic." for _ in prompts], {"tokens_per_second": 1}

    monkeypatch.setattr(negatives, "chat_generate", fake_generate)
    m = run_stage(full_run, "stage=rm", *PREF, "run.name=p", "peft=full", "trainer.max_steps=2",
                  "trainer.learning_rate=1e-4", "data.rejected_source=policy")
    sft, base = weight(full_run / "p" / "sft" / "model"), base_weight()
    assert not torch.equal(sft, base)  # SFT changed the tensor, so the comparisons below tell the two apart
    assert torch.equal(at_start["model"], sft)  # the reward model's backbone starts as the SFT model, not the base
    assert parent(full_run, "rm") == str(full_run / "p" / "sft" / "model")
    assert asked and asked[0][0] == "LlamaForCausalLM" and torch.equal(asked[0][1], sft)  # on-policy sides: SFT's
    assert m["data/on_policy_rejected"] > 0
    out = full_run / "p" / "rm"
    assert (out / "model" / "config.json").exists() and not (out / "adapter").exists()
    rm = AutoModelForSequenceClassification.from_pretrained(str(out / "model"), num_labels=1)
    trained = rm.state_dict()[KEY]
    assert (trained - sft).norm() < (trained - base).norm()
    assert rm(torch.tensor([[1, 2, 3, 4]])).logits.shape == (1, 1)


def test_rm_full_merges_a_lora_sft_adapter(lora_run, at_start):
    run_stage(lora_run, "stage=rm", *PREF, "run.name=p", "peft=full", *STEPS)
    merged = merged_weight(lora_run / "p" / "sft" / "adapter")
    assert not torch.equal(merged, base_weight())
    torch.testing.assert_close(at_start["model"], merged, rtol=0, atol=1e-6)
    assert parent(lora_run, "rm") == str(lora_run / "p" / "sft" / "adapter")
    assert not torch.equal(weight(lora_run / "p" / "rm" / "model"), merged)  # the merged backbone trained too


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_stage_trains_the_full_sft_model(full_run, at_start, stage):
    from transformers import AutoModelForCausalLM

    m = run_stage(full_run, f"stage={stage}", *PREF, PAIR_LENGTH, "run.name=p", "peft=full", *STEPS)
    assert m["train/global_step"] == 2 and math.isfinite(m["train/first_loss"]) and "train/last_loss" in m
    sft = weight(full_run / "p" / "sft" / "model")
    assert torch.equal(at_start["model"], sft)
    assert at_start["ref"] is None  # precompute_ref: TRL reads the reference log-probs off the SFT model, once
    assert parent(full_run, stage) == str(full_run / "p" / "sft" / "model")
    out = full_run / "p" / stage
    assert (out / "model" / "model.safetensors").exists() and not (out / "adapter").exists()
    policy = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert not torch.equal(policy.state_dict()[KEY], sft)  # every weight trained
    assert policy(torch.tensor([[1, 2, 3]])).logits.shape[-1] == policy.config.vocab_size


def test_dpo_full_merges_a_lora_sft_and_keeps_it_as_the_reference(lora_run, at_start):
    """Without precomputed log-probs TRL would load the reference from the config's name (the bare base, after a
    merge); the stage hands it a frozen copy of the merged SFT model instead."""
    m = run_stage(lora_run, "stage=dpo", *PREF, PAIR_LENGTH, "run.name=p", "peft=full", *STEPS,
                  "dpo.precompute_ref=false", "dpo.loss_type=sigmoid")
    merged = merged_weight(lora_run / "p" / "sft" / "adapter")
    torch.testing.assert_close(at_start["model"], merged, rtol=0, atol=1e-6)
    torch.testing.assert_close(at_start["ref"], merged, rtol=0, atol=1e-6)
    assert abs(m["train/first_loss"] - math.log(2)) < 1e-4  # step 1: policy == reference, so -log sigmoid(0)
    assert not torch.equal(weight(lora_run / "p" / "dpo" / "model"), merged)  # the merged weights trained


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_an_adapter_on_a_full_sft_model_is_refused(full_run, stage):
    sft = full_run / "p" / "sft" / "model"
    msg = (f"{stage}: {sft} is a whole sft model (sft ran with peft=full, bitfit or freeze), not an adapter; a "
           f"peft=lora adapter trained on it would not load on the base later stages use: run {stage} with peft=full, "
           f"or sft with peft=lora")
    with pytest.raises(AlignError, match=f"^{re.escape(msg)}$"):
        run_stage(full_run, f"stage={stage}", *PREF, "run.name=p", "peft=lora")
    assert not (full_run / "p" / stage).exists()  # refused before the stage folder was made


def test_a_lora_reward_model_on_a_full_sft_model_is_refused(full_run):
    sft = full_run / "p" / "sft" / "model"
    msg = (f"rm: {sft} is a whole sft model (sft ran with peft=full, bitfit or freeze), not an adapter; a peft=lora "
           f"reward model starts from the sft adapter's weights: run rm with peft=full, or rm.init=base")
    with pytest.raises(AlignError, match=f"^{re.escape(msg)}$"):
        run_stage(full_run, "stage=rm", *PREF, "run.name=p", "peft=lora", "rm.init=sft")


def test_grpo_and_ppo_refuse_full_fine_tuning(full_run):
    from align.rl import policy

    for stage in ("grpo", "ppo"):
        msg = (f"peft=full cannot run the {stage} stage: {stage} keeps the policy, its reference and the reward model "
               f"as adapters on one frozen base; run sft, rm and {stage} with peft=lora, qlora or dora, or use dpo or "
               "kto with peft=full")
        with pytest.raises(AlignError, match=f"^{re.escape(msg)}$"):
            run_stage(full_run, f"stage={stage}", *PREF, "run.name=p", "peft=full")
        # the pipeline says it before sft and rm run
        with pytest.raises(AlignError, match=f"^{re.escape(msg)}$"):
            run_stage(full_run, "stage=pipeline", *PREF, "run.name=pf", "peft=full", f"pipeline.policy={stage}")
        assert not (full_run / "pf").exists()
    cfg = compose(full_run, "stage=ppo", *PREF, "run.name=p", "peft=full")  # and loading ppo's policy, as ever
    with pytest.raises(AlignError, match="cannot run the ppo stage"):
        policy.load_policy(cfg.model, cfg.peft, None, full_run / "p" / "sft" / "model")
