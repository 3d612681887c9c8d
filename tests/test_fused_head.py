"""TRL's fused LM head on the CPU projects only trained positions (align/fused_head.py, trainer.compact_lm_head): the
same log-probabilities, entropy, loss and LoRA gradients as TRL's every-position layout, and the stages switch it."""

import pytest
import torch

from conftest import SFT_ARGS, run_stage
from test_shared_prefix import SFT_ROWS, batch, forward_and_grads, fused_model


@pytest.fixture
def layout():
    """Switch the layout for one test, and leave TRL's own behind."""
    from align import fused_head

    yield fused_head.score_trained_positions_only
    fused_head.score_trained_positions_only(False)


def projected_rows(monkeypatch) -> list[int]:
    """The number of positions each fused-head call projects through the vocabulary."""
    from trl.trainer import utils as trl_utils

    seen, kernel = [], trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            seen.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    return seen


def test_compact_layout_gives_the_same_values_and_gradients(layout, monkeypatch):
    model, tokenizer = fused_model("tiny")
    ids, mask, labels = batch(tokenizer, SFT_ROWS)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    seen = projected_rows(monkeypatch)
    assert layout(False) is False
    want, want_grads = forward_and_grads(model, inputs)
    assert layout(True) and layout(True)  # idempotent: one wrapper, not one per call
    got, got_grads = forward_and_grads(model, inputs)
    trained = int((labels[:, 1:] != -100).sum())
    assert seen == [ids.shape[0] * (ids.shape[1] - 1), trained] and trained < seen[0] / 2
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())
    layout(False)
    forward_and_grads(model, inputs)
    assert seen[-1] == seen[0]  # TRL's layout again


def test_sft_stage_trains_the_same_either_way(layout, tmp_path):
    from trl.trainer import utils as trl_utils

    runs = {}
    for compact in ("true", "false"):
        runs[compact] = run_stage(tmp_path / compact, *SFT_ARGS, "peft.lora_dropout=0", "trainer.max_steps=2",
                                  f"trainer.compact_lm_head={compact}", "trainer.shared_prefix=false")
        assert hasattr(trl_utils._use_triton, "align_original") == (compact == "true")
    keys = [k for k in runs["false"] if k.startswith(("train/first_loss", "train/last_loss", "eval_loss"))]
    assert len(keys) == 3, keys
    for key in keys:
        assert runs["true"][key] == pytest.approx(runs["false"][key], rel=1e-4, abs=1e-5), key
