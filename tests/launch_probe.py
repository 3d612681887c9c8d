"""Run one align stage under a launcher (torchrun, accelerate launch) and record what each process trained.

    accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 2 tests/launch_probe.py OUT stage=sft ...

Writes OUT/rank<RANK>.json: a digest of every trainable weight after training (gathered in full where FSDP shards
them) and the losses the trainer logged. tests/test_launchers.py compares the ranks with each other and with a
one-process run; the probe changes nothing in what the stage does.
"""

import hashlib
import json
import os
import sys
from pathlib import Path


def weight_digests(model) -> dict:
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 shards are DTensors
        out[name] = hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def main(out: str, overrides: list[str]) -> None:
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
    Path(out).mkdir(parents=True, exist_ok=True)
    run_stage(compose(*overrides))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
