"""Shared-prefix training (align/shared_prefix.py): the tokens a batch's rows share run once, and the loss, every
per-token output TRL reads and every gradient equal the unshared computation within float tolerance, on the tiny
model and the embedded one; the stages train the same with it on and off."""

import pytest
import torch

from conftest import PREF, SFT_ARGS, copy_run, run_stage

SYSTEM = "You are a tax assistant. Answer questions about income tax; decline anything else."
SFT_ROWS = [("What is a W-2?", "A W-2 reports wages."),
            ("Can I deduct my home office?", "Yes, if you use it only for work."),
            ("How do I bake bread?", "I can only help with tax questions."),
            ("When is the filing deadline?", "Usually April 15.")]
# a DPO batch as TRL lays it out: every chosen row, then every rejected row of the same prompts
DPO_ROWS = [("What is a W-2?", "A W-2 reports wages."), ("How do I bake bread?", "I can only help with tax."),
            ("What is a W-2?", "Bread needs flour."), ("How do I bake bread?", "Knead it for ten minutes, then bake.")]


def batch(tokenizer, rows):
    """Right-padded input ids, attention mask and labels (-100 on the prompt and the padding), as TRL collates."""
    encoded = []
    for question, answer in rows:
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": question}],
                                               tokenize=True, add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        encoded.append((prompt, tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]))
    width = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c) in enumerate(encoded):
        n = len(p) + len(c)
        ids[i, :n], mask[i, :n], labels[i, len(p):n] = torch.tensor(p + c), 1, torch.tensor(c)
    return ids, mask, labels


def test_plan_shares_the_common_prefix_and_each_pairs_prompt():
    from align import shared_prefix

    # rows 0/2 and 1/3 share their prompt (7, 8 and 9 are answers); all four share tokens 1, 2
    ids = torch.tensor([[1, 2, 3, 4, 7, 7, 0], [1, 2, 5, 6, 6, 8, 8], [1, 2, 3, 4, 9, 0, 0], [1, 2, 5, 6, 6, 9, 0]])
    mask = (torch.arange(7) < torch.tensor([6, 7, 5, 6])[:, None]).long()
    labels = ids.masked_fill(~torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1],
                                            [0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool), -100)
    p = shared_prefix.plan(ids, mask, labels)
    assert p.prefix == 2 and [s.tolist() for s in p.segments] == [[3], [5, 6]]
    assert p.group_of_row.tolist() == [0, 1, 0, 1] and p.split.tolist() == [3, 4, 3, 4]  # the last prompt token on
    assert p.padded_tokens == 2 + 2 * 2 + 4 * 3 and p.unshared_tokens == 28 and shared_prefix.worth_sharing(p)
    # every row's prompt its own: only the common prefix is shared, each row runs from there
    distinct = ids.clone()
    distinct[2, 2:4], distinct[3, 2:4] = torch.tensor([4, 3]), torch.tensor([6, 5])
    p = shared_prefix.plan(distinct, mask, labels)
    assert p.prefix == 2 and p.segments == [] and p.split.tolist() == [2, 2, 2, 2]
    # a trained label inside the common part stops the sharing before it: its log-prob needs its own row
    early = labels.clone()
    early[:, 2] = ids[:, 2]
    assert shared_prefix.plan(ids, mask, early).prefix == 1
    # left padding, or a single row, is not shared
    assert shared_prefix.plan(ids, mask.flip(1), labels) is None and shared_prefix.plan(ids[:1], mask[:1],
                                                                                        labels[:1]) is None


def fused_model(model_name: str):
    """A LoRA model with TRL's fused LM head, as SFTTrainer and DPOTrainer build it; LoRA's B drawn non-zero so the
    adapter matters, and eval mode so LoRA dropout draws no different masks in the two computations."""
    from trl.trainer.utils import add_fused_lm_head

    from align import adapters, models
    from align.config import compose

    cfg = compose(f"model={model_name}", "stage=sft", "model.cpu_bf16=false")
    tokenizer = models.load_tokenizer(cfg.model)
    model = adapters.attach(models.load_model(cfg.model, cfg.peft, "causal", tokenizer), cfg.peft, "CAUSAL_LM")
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model.eval(), tokenizer


def forward_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs, fused_lm_head=True)
    (-out.log_probs.sum() - 0.1 * out.entropy.sum()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name", ["tiny", pytest.param("smollm2_135m", marks=pytest.mark.embedded)])
def test_shared_forward_equals_the_unshared_one(model_name):
    from align import shared_prefix

    model, tokenizer = fused_model(model_name)
    for rows in (SFT_ROWS, DPO_ROWS):
        ids, mask, labels = batch(tokenizer, rows)
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
        shared_prefix.disable(model)
        want, want_grads = forward_and_grads(model, inputs)
        assert shared_prefix.enable(model, "test")
        got, got_grads = forward_and_grads(model, inputs)
        stats = model._align_shared_prefix_stats
        assert stats["shared_batches"] == 1 and stats["computed_tokens"] < 0.75 * stats["unshared_tokens"]
        for field in ("log_probs", "entropy"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-4)
        assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.is_top1, want.is_top1)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())


def test_reward_model_scores_equal_the_unshared_ones():
    """rm: a reward model's batch (chosen rows, then rejected) shares each pair's prompt; its scores and gradients
    equal the unshared ones, and a row ending in pad-token ids is not shared (the head would score another token)."""
    from align import adapters, models, shared_prefix
    from align.config import compose

    cfg = compose("model=tiny", "stage=rm", "model.cpu_bf16=false")
    tokenizer = models.load_tokenizer(cfg.model)
    model = adapters.attach(models.load_model(cfg.model, cfg.peft, "score", tokenizer), cfg.peft, "SEQ_CLS").eval()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    ids, mask, _ = batch(tokenizer, DPO_ROWS)

    def scores_and_grads():
        model.zero_grad()
        scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        scores.pow(2).sum().backward()
        return scores, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = scores_and_grads()
    assert shared_prefix.enable(model, "test", head="score")
    got, got_grads = scores_and_grads()
    assert model._align_shared_prefix_stats["shared_batches"] == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item())
    ended_in_pad = ids.clone()  # SmolLM2's pad token is its <|im_end|>: row 0's reply all pad ids from position 30
    ended_in_pad[0, 30:int(mask[0].sum())] = tokenizer.pad_token_id
    assert shared_prefix.score_plan(ended_in_pad, mask, tokenizer.pad_token_id) is None
    assert shared_prefix.score_plan(ids, mask, tokenizer.pad_token_id) is not None
    shared_prefix.disable(model)
    assert "_align_shared_prefix_stats" not in model.__dict__ and scores_and_grads()[0].equal(want)


def test_calls_it_cannot_share_run_unshared():
    """Packed rows (position ids), pre-shifted labels and a caller's own cache pass through untouched; so does a
    model under gradient checkpointing, which would run each layer's cache update twice."""
    from align import shared_prefix

    model, tokenizer = fused_model("tiny")
    ids, mask, labels = batch(tokenizer, SFT_ROWS)
    shared_prefix.enable(model, "test")
    stats = model._align_shared_prefix_stats
    model(input_ids=ids, attention_mask=mask, labels=labels, position_ids=torch.arange(ids.shape[1]).expand_as(ids),
          fused_lm_head=True)
    model(input_ids=ids, attention_mask=mask, shift_labels=labels, fused_lm_head=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert stats["batches"] == 0
    assert "prompt-learning" in (shared_prefix.unsupported(
        type("M", (), {"config": model.config, "peft_config": {"d": type("C", (), {"is_prompt_learning": True})()}})())
        or "")


@pytest.mark.parametrize("stage", ["sft", "sft-bf16", "rm", "dpo"])
def test_stage_trains_the_same_with_and_without_shared_prefixes(stage, tax_sft, tmp_path):
    """Three steps with trainer.shared_prefix on and off, LoRA dropout off: the same losses (and DPO rewards), and
    the metrics say every batch was shared."""
    runs = {}
    for share in ("true", "false"):
        common = ["peft.lora_dropout=0", "trainer.max_steps=3", "trainer.learning_rate=1e-3",
                  f"trainer.shared_prefix={share}"]
        if stage.startswith("sft"):  # sft-bf16: under CPU autocast, where accelerate wraps the forward again
            bf16 = ["model.cpu_bf16=true"] if stage == "sft-bf16" else []
            runs[share] = run_stage(tmp_path / share, *SFT_ARGS, *common, *bf16)
        else:
            out = copy_run(tax_sft, tmp_path / share)
            runs[share] = run_stage(out, f"stage={stage}", *PREF, "run.name=p", *common)
    on, off = runs["true"], runs["false"]
    assert on["train/shared_prefix_batches"] == 1.0 and on["train/shared_prefix_token_ratio"] < 0.8
    assert "train/shared_prefix_batches" not in off
    keys = [k for k in off if k.startswith(("train/first_loss", "train/last_loss", "eval_loss", "train/rewards/",
                                            "eval/accuracy", "eval/mean_margin", "eval/loss"))]
    assert len(keys) >= {"sft": 3, "sft-bf16": 3, "rm": 4, "dpo": 6}[stage], keys
    tolerance = dict(rel=2e-2) if stage == "sft-bf16" else dict(rel=1e-4, abs=1e-5)  # bf16 rounds at 3 digits
    for key in keys:
        assert on[key] == pytest.approx(off[key], **tolerance), key


def test_benchmark_script_writes_json_and_table(tmp_path):
    """scripts/bench_shared_prefix.py (the figures in docs/benchmarks.md) on the tiny model, one step, sft only."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "shared_prefix.json"
    res = subprocess.run([sys.executable, "scripts/bench_shared_prefix.py", "--model", "tiny", "--steps", "1",
                          "--stages", "sft", "--settings", "trl,shared", "--data", "instructions", "--out-json",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    on, off = record["results"]["sft"]["shared"], record["results"]["sft"]["trl"]
    assert on["ok"] and off["ok"] and off["shared_prefix_token_ratio"] is None
    assert on["shared_prefix_token_ratio"] < 0.8
    assert record["cpu"] and record["command"].startswith("python scripts/bench_shared_prefix.py --model tiny")
    assert "| sft |" in res.stdout
