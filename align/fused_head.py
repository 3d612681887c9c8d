"""TRL's fused LM head on the CPU: score only the positions that are trained.

TRL's trainers (SFT, DPO, KTO, GRPO, RLOO; the DPO reference precompute) call the model with
`fused_lm_head=True` (trl.trainer.utils.add_fused_lm_head): the backbone runs, then the LM head projects the hidden
states through the whole vocabulary in tiles and folds each tile into per-token log-probabilities. On a device with
Triton it projects only the positions whose next-token label is not -100. Everywhere else it projects every position,
prompt and padding included, so that compilers such as Neuron's see one tile shape per batch size (trl 1.16).

On the CPU nothing is compiled, and those positions are most of the work: SmolLM2's vocabulary is 49,152 tokens,
and a chat row trains only its answer. Here the CPU takes TRL's own compact path: the same kernel on the trained
positions only, the same outputs (zeros at untrained positions, as before), the same gradients. Measured against
TRL's layout by `python scripts/bench_shared_prefix.py` (docs/benchmarks.md).

It changes one decision in TRL and nothing else: `trl.trainer.utils._use_triton`, which that module consults only to
choose the compact layout; the kernels keep their own check and still run their CPU code.
"""

import logging

log = logging.getLogger(__name__)


def score_trained_positions_only(on: bool = True) -> bool:
    """Make TRL's fused-head forward project only trained positions on the CPU as well (on=False: TRL's own layout
    again). Process-wide and idempotent. Returns whether the compact layout is on for the CPU; False, with a warning,
    where this TRL has no such switch (then nothing changes)."""
    from trl.trainer import utils as trl_utils

    chooser = getattr(trl_utils, "_use_triton", None)
    if chooser is None:  # nothing to switch: TRL's own layout is all there is
        if on:
            log.warning("this TRL has no trl.trainer.utils._use_triton: its fused LM head scores every position on the "
                        "CPU")
        return False
    original = getattr(chooser, "align_original", chooser)
    if not on:
        trl_utils._use_triton = original
        return False
    if chooser is original:

        def compact_layout(device) -> bool:
            return device.type == "cpu" or original(device)

        compact_layout.align_original = original
        trl_utils._use_triton = compact_layout
    return True
