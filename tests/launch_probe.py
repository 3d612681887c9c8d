"""Run align stages under a launcher (torchrun, accelerate launch) and record what each process trained.

    accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 2 tests/launch_probe.py OUT stage=sft ...
    ... tests/launch_probe.py OUT1 stage=sft ... -- OUT2 stage=dpo ...   # several runs, one after another

Writes OUT/rank<RANK>.json for each run: a digest of every trainable weight after training (gathered in full where
FSDP shards them) and the losses the trainer logged. Several runs in one launch pay for the launcher and the
processes' imports once. tests/test_launchers.py compares the ranks with each other and with a one-process run
(`main` called in the test's own process); the probe changes nothing in what the stages do.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

SEPARATOR = "--"


def full_weight(param):
    """The whole tensor on every rank: FSDP2 shards are DTensors, DeepSpeed ZeRO-3 keeps a partition per rank (both
    gathers are collective: every rank asks for the same tensors in the same order)."""
    if hasattr(param, "full_tensor"):
        return param.full_tensor().detach().float().cpu()
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().cpu().clone()
    return param.detach().float().cpu()


def weight_digests(model) -> dict:
    return {name: hashlib.sha256(full_weight(param).contiguous().numpy().tobytes()).hexdigest()
            for name, param in model.named_parameters() if param.requires_grad}


def main(out: str, overrides: list[str]) -> None:
    """Run one stage (compose(*overrides)) and write this process's record to OUT/rank<RANK>.json; align's
    training.train is wrapped for the run and restored after it."""
    from align import training
    from align.config import compose
    from align.launch import run_stage

    original = training.train

    def train_and_record(trainer, run, folder):
        metrics = original(trainer, run, folder)
        model = trainer.accelerator.unwrap_model(trainer.model)
        record = {"weights": weight_digests(model), "losses": training.loss_history(trainer),
                  "world_size": trainer.accelerator.num_processes,
                  "distributed_type": str(trainer.accelerator.distributed_type)}
        Path(out, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
        return metrics

    training.train = train_and_record
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        run_stage(compose(*overrides))
    finally:
        training.train = original


def runs(argv: list[str]) -> list[tuple[str, list[str]]]:
    """OUT overrides... [-- OUT overrides...]... as (OUT, overrides) pairs."""
    groups, current = [], []
    for arg in [*argv, SEPARATOR]:
        if arg == SEPARATOR:
            groups.append((current[0], current[1:]))
            current = []
        else:
            current.append(arg)
    return groups


if __name__ == "__main__":
    for folder, stage_overrides in runs(sys.argv[1:]):
        main(folder, stage_overrides)
