"""model.cpu_bf16: bf16 autocast on CPUs with native bf16 (weights stay fp32), for training and generation."""

import pytest
import torch

from conftest import SFT_ARGS, compose, run_stage

from align import AlignError, models, training, tracking
from align.generation import chat_generate


def autocast(cfg) -> bool:
    return models.cpu_autocast(cfg.model, cfg.peft)


def test_native_bf16_read_from_cpu_flags():
    assert models.native_cpu_bf16("flags : fpu sse2 avx2 avx512f avx512_bf16 avx512vl")
    assert models.native_cpu_bf16("flags : fpu amx_bf16 amx_tile")
    assert not models.native_cpu_bf16("flags : fpu sse2 avx2 avx512f avx512_vnni")


def test_cpu_bf16_setting(tmp_path, monkeypatch):
    assert not autocast(compose(tmp_path, *SFT_ARGS))  # tiny pins it off: exact fp32 tests
    assert autocast(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=true"))
    monkeypatch.setattr(models, "native_cpu_bf16", lambda cpuinfo=None: True)
    assert autocast(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=auto"))
    assert not autocast(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=auto", "peft=qlora"))
    monkeypatch.setattr(models, "native_cpu_bf16", lambda cpuinfo=None: False)
    assert not autocast(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=auto"))
    with pytest.raises(AlignError, match="model.cpu_bf16"):
        autocast(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=maybe"))


def test_bf16_sft_learns_and_trainer_runs_mixed(tmp_path):
    from trl import SFTConfig

    cfg = compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=true")
    args = training.trainer_args(cfg, tmp_path / "x", tracking.start(cfg, "sft"), SFTConfig, has_eval=False)
    assert args.bf16
    # two rows in one batch of two: every step sees the same batch, so the first and last loss compare like with like
    m = run_stage(tmp_path, *SFT_ARGS, "model.cpu_bf16=true", "run.name=b", "trainer.max_steps=12", "data.max_rows=2",
                  "trainer.per_device_train_batch_size=2", "trainer.learning_rate=2e-3")
    assert m["train/last_loss"] < m["train/first_loss"] - 0.1, m
    saved = tmp_path / "b" / "sft" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(saved).values())  # fp32 master weights


def test_generation_runs_under_autocast(tmp_path):
    cfg = compose(tmp_path, *SFT_ARGS)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.peft, "causal", tokenizer)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "what is a tax credit?"}]]
    texts, _ = chat_generate(model, tokenizer, convs, max_new_tokens=4, cpu_bf16=True)
    assert len(texts) == 2 and set(seen) == {torch.bfloat16}
    seen.clear()
    chat_generate(model, tokenizer, convs, max_new_tokens=4, cpu_bf16=False)
    hook.remove()
    assert set(seen) == {torch.float32}


def test_ppo_accelerator_follows_the_precision_of_each_run(tmp_path):
    """Accelerate's state is a per-process singleton: a second run with another precision must not fail."""
    from align.stages.ppo import accelerator_for

    assert accelerator_for(compose(tmp_path, *SFT_ARGS, "model.cpu_bf16=true")).mixed_precision == "bf16"
    assert accelerator_for(compose(tmp_path, *SFT_ARGS)).mixed_precision == "no"
