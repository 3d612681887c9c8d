"""SFT end to end on the tiny model: every adapter method learns, outputs, overwrite, resume, W&B."""

import json

import pytest
import torch

from conftest import TINY, cli, run_stage

from align import AlignError

SFT = ["stage=sft", *TINY, "data=instructions", "scope=none", "trainer.learning_rate=2e-3"]
# two rows in one batch of two: every step sees the same batch, so the first and last loss compare like with like
SAME_BATCH = ["data.max_rows=2", "trainer.per_device_train_batch_size=2"]


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "full"])
def test_sft_loss_falls_for_each_method(tmp_path, method):
    m = run_stage(tmp_path, *SFT, f"peft={method}", "run.name=m", "trainer.max_steps=12", *SAME_BATCH)
    assert m["train/last_loss"] < m["train/first_loss"] - 0.1, m
    out = tmp_path / "m" / "sft"
    saved = out / ("model" if method == "full" else "adapter")
    assert (saved / ("model.safetensors" if method == "full" else "adapter_model.safetensors")).exists()
    assert {"config.yaml", "metrics.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    if method == "full":
        assert metrics["trainable_share"] == 1.0
    else:
        assert metrics["trainable_share"] < 0.2
    if method == "qlora":
        cfg = json.loads((saved / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"


def test_adapter_loads_with_autopeft(tiny_sft):
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(tiny_sft / "base" / "sft" / "adapter"))
    assert model.peft_config["default"].r == 16


def test_refuses_to_overwrite_a_finished_run(tiny_sft):
    out = tiny_sft / "base" / "sft"
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    stamp = (out / "manifest.json").read_text()
    with pytest.raises(AlignError, match="run.overwrite=true"):
        run_stage(tiny_sft, *SFT, "run.name=base", "trainer.max_steps=2")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert (out / "manifest.json").read_text() == stamp
    run_stage(tiny_sft, *SFT, "run.name=base", "trainer.max_steps=2", "run.overwrite=true", *SAME_BATCH)
    assert (out / "manifest.json").read_text() != stamp


def test_cli_refusal_is_one_line_and_keeps_outputs(tiny_sft):
    res = cli(*SFT, "run.name=base", "trainer.max_steps=2", f"run.output_dir={tiny_sft}")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "run.overwrite=true" in res.stderr
    assert (tiny_sft / "base" / "sft" / "manifest.json").exists()


def test_resume_continues_from_last_checkpoint(tmp_path):
    args = [*SFT, "run.name=r", "trainer.max_steps=6", "trainer.save_steps=3", "trainer.per_device_train_batch_size=2"]
    # an interrupted run: checkpoints but no manifest
    run_stage(tmp_path, *args)
    out = tmp_path / "r" / "sft"
    (out / "manifest.json").unlink()
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    with pytest.raises(AlignError, match="run.resume=true"):
        run_stage(tmp_path, *args)
    m = run_stage(tmp_path, *args, "run.resume=true")
    assert m["train/global_step"] == 6
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    # only steps 4-6 were trained in the resumed run: its log starts where checkpoint-3 stopped
    assert [h["step"] for h in state["log_history"] if "loss" in h][:4] == [1, 2, 3, 4]


def wandb_records(path):
    """Records of an offline .wandb file: wandb's LevelDB-style log (7-byte header, 32 KiB blocks of
    crc32 | length | type | payload chunks); the payloads are wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield rec
            buf = b""
        elif kind in (2, 3):  # first and middle chunks
            buf += chunk


def test_wandb_offline_run_holds_train_loss(tmp_path):
    run_stage(tmp_path, *SFT, "tracking=wandb", "tracking.mode=offline", "run.name=w", "trainer.max_steps=3",
              *SAME_BATCH)
    files = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    keys, runs_seen = set(), []
    for rec in wandb_records(files[0]):
        if rec.HasField("history"):
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
        if rec.HasField("run"):
            runs_seen.append((rec.run.run_group, rec.run.job_type))
    assert "train/loss" in keys
    assert ("w", "sft") in runs_seen


def test_export_merged_logits_match(tiny_sft):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_stage(tiny_sft, "stage=export", *TINY, "run.name=base", "scope=none", "data=instructions")
    from align import models

    merged = AutoModelForCausalLM.from_pretrained(str(tiny_sft / "base" / "export" / "model"))

    base = AutoModelForCausalLM.from_pretrained(models.resolve("align://tiny-llama"))
    unmerged = PeftModel.from_pretrained(base, str(tiny_sft / "base" / "sft" / "adapter"))
    ids = torch.tensor([[1, 520, 3000, 42, 7]])
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert not any(p.name.endswith(".bin") for p in (tiny_sft / "base" / "export" / "model").iterdir())


def test_last_n_layers_adapts_only_the_top_blocks(tmp_path):
    from safetensors.torch import load_file

    m = run_stage(tmp_path, *SFT, "run.name=top", "trainer.max_steps=8", "peft.last_n_layers=1", *SAME_BATCH)
    assert m["train/last_loss"] < m["train/first_loss"]
    keys = load_file(str(tmp_path / "top" / "sft" / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all(".layers.1." in k for k in keys)
    with pytest.raises(AlignError, match="last_n_layers"):
        run_stage(tmp_path, *SFT, "run.name=top2", "trainer.max_steps=1", "peft.last_n_layers=5")
