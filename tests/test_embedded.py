"""The embedded default, SmolLM2-135M-Instruct from the PyPI wheel: cached as safetensors, QLoRA SFT runs."""

import json

import pytest

from conftest import run_stage

pytestmark = pytest.mark.embedded


def test_embedded_model_is_a_plain_safetensors_cache():
    from align import models

    path = models.resolve("align://smollm2-135m-instruct")
    files = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith((".bin", ".gguf")) for name in files)
    config = json.loads((__import__("pathlib").Path(path) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30


def test_qlora_sft_on_the_embedded_model(tmp_path):
    """Two QLoRA steps on the 135M model, on the small instructions recipe: what is checked is QLoRA on this model,
    and the default recipe's build would cost more than the training."""
    m = run_stage(tmp_path, "stage=sft", "model=smollm2_135m", "peft=qlora", "tracking=none", "run.name=t2",
                  "data=instructions", "scope=none", "trainer.max_steps=2", "data.max_rows=2", "trainer.max_length=160",
                  "trainer.per_device_train_batch_size=1", "trainer.logging_steps=1")
    assert m["train/global_step"] == 2 and m["trainable_share"] < 0.1
    assert (tmp_path / "t2" / "sft" / "adapter" / "adapter_model.safetensors").exists()


def test_every_shipped_training_row_leaves_room_for_its_answer():
    """The main job trains at trainer.max_length=80 and the trainer drops rows whose prompt fills it: 58 of
    unsafe_c's 80 rows were once lost that way. Every tax_assistant training prompt must leave room for at least
    the answer's opener (4 tokens)."""
    from align import models
    from align.config import compose
    from align.data import recipes

    cfg = compose("stage=sft", "tracking=none", "data=tax_assistant")
    assert cfg.data.recipe == "tax_assistant" and cfg.trainer.max_length == 80
    tokenizer = models.load_tokenizer(cfg.model)
    built = recipes.build(cfg, tokenizer)
    too_long = []
    for row in built.sft_train:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > cfg.trainer.max_length - 4:
            too_long.append((n, row["messages"][-2]["content"][:60]))
    assert len(built.sft_train) > 1000 and not too_long, too_long[:5]
