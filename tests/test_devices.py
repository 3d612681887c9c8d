"""Issue #29, the one device rule: every model the project loads goes to this process's device (accelerate's view),
in the precision the config asks for, through models.load_model."""

import ast

import torch
from accelerate import PartialState

from conftest import ROOT, TINY, compose

from align import models


def test_process_device_is_accelerates():
    device = models.process_device()
    assert device == PartialState().device
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_every_head_loads_on_the_process_device_in_the_asked_precision(tmp_path):
    cfg = compose(tmp_path, *TINY, "stage=sft")
    for head in ("causal", "score"):
        model = models.load_model(cfg.model, cfg.peft, head)
        params = list(model.parameters())
        assert {p.device for p in params} == {models.process_device()}, head
        assert {p.dtype for p in params} == {models.pick_dtype(cfg.model.dtype)}, head
    bf16 = compose(tmp_path, *TINY, "stage=sft", "model.dtype=bfloat16")
    assert {p.dtype for p in models.load_model(bf16.model, bf16.peft).parameters()} == {torch.bfloat16}


def test_no_model_is_loaded_around_the_rule():
    """A review that cannot go stale: outside models.py, a transformers model class's from_pretrained must be sent to
    models.process_device() on the same statement (PEFT adapters attach to a model already placed)."""
    offenders = []
    for f in sorted((ROOT / "align").rglob("*.py")):
        if f.name == "models.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call) or getattr(node.func, "attr", None) != "from_pretrained":
                continue
            owner = ast.unparse(node.func.value)
            if owner.startswith("AutoModel") or owner.endswith("ForCausalLM"):
                statement = ast.get_source_segment(f.read_text(), node) or ""
                line = f.read_text().splitlines()[node.lineno - 1]
                if "process_device" not in line and "process_device" not in statement:
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
