"""accelerate's process state, in one place: which process this is and how many there are."""

import torch


def distributed_state():
    """accelerate's process state. On CPU it must be created with cpu=True, or under torchrun every
    process believes it is alone and trains on its own; the first call fixes it for the whole process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return distributed_state().is_main_process


# what `accelerate launch --config_file conf/accelerate/<x>.yaml` sets for the sharding backends
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def refuse_sharded_launch(stage: str) -> None:
    """ppo and grpo generate with the policy inside their loop and switch adapters (policy, reference, reward) on
    one base, which needs the whole base on every process: refuse FSDP and DeepSpeed launches in one line."""
    import os

    from align import AlignError

    for var, backend in SHARDED_LAUNCHES.items():
        if os.environ.get(var, "false").lower() == "true":
            raise AlignError(f"{stage} does not run under {backend} (launched with {var}=true): it generates with the "
                             "policy inside its loop; launch it with conf/accelerate/ddp.yaml or torchrun (only the "
                             "LoRA adapters train, so every process holds the frozen base)")
