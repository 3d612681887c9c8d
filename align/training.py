"""Glue shared by the stages that train with a TRL trainer: arguments, resume, save, finish."""

import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from align import AlignError, adapters, fused_head, models, runs, shared_prefix
from align.distributed import distributed_state, is_main_process  # noqa: F401 (stages call training.*)

log = logging.getLogger(__name__)


def trainer_args(cfg, out: Path, tracker, config_cls, has_eval: bool, **stage_kwargs):
    """cfg.trainer -> a TRL config (SFTConfig, DPOConfig, ...); trainer.extra passes through as-is."""
    t = cfg.trainer
    # before the trainer exists: DPO's constructor already scores the reference with the fused head
    fused_head.score_trained_positions_only(t.compact_lm_head)
    dtype = models.pick_dtype(cfg.model.dtype)
    kwargs = dict(
        output_dir=str(Path(out) / "checkpoints"),
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=dtype == torch.bfloat16 or models.cpu_autocast(cfg.model, cfg.peft),
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun's CPU processes one gloo group
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=tracker.report_to,
        run_name=f"{cfg.run.name}-{cfg.stage.name}",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(stage_kwargs)
    # plain lists and dicts: transformers checks types (GaLore's optim_target_modules must be a list)
    kwargs.update(OmegaConf.to_container(t.extra, resolve=True) if OmegaConf.is_config(t.extra) else dict(t.extra))
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise AlignError(f"trainer.extra: {config_cls.__name__} has no field(s) {', '.join(unknown)}")
    if t.gradient_checkpointing:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    check_optimizer(t, kwargs)
    return config_cls(**kwargs)


def check_optimizer(t, kwargs: dict) -> None:
    """Memory-saving optimizers live in optional packages: say which one is missing in one line, before training."""
    import importlib.util

    bnb_optims = ("adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_",
                  "rmsprop_bnb", "galore_adamw_8bit")
    needs = [pkg for pkg, hit in (("galore_torch", t.optim.startswith("galore_")),
                                  ("lomo_optim", t.optim in ("lomo", "adalomo")),
                                  ("apollo_torch", t.optim.startswith("apollo_")),
                                  ("torchao", t.optim in ("adamw_torch_4bit", "adamw_torch_8bit")),
                                  ("bitsandbytes", t.optim.startswith(bnb_optims))) if hit]
    missing = [pkg for pkg in needs if importlib.util.find_spec(pkg) is None]
    if missing:
        raise AlignError(f"trainer.optim={t.optim} needs the {missing[0]} package (pip install "
                         f"{missing[0].replace('_', '-')}); or use trainer.optim=adamw_torch")
    if t.optim == "adalomo" and not torch.cuda.is_available():
        raise AlignError("trainer.optim=adalomo: lomo-optim's AdaLomo runs on CUDA only; on the CPU use "
                         "trainer.optim=lomo or adamw_torch")
    if t.optim.startswith("galore_") and not kwargs.get("optim_target_modules"):
        raise AlignError(f"trainer.optim={t.optim} needs trainer.extra.optim_target_modules (e.g. [attn, mlp])")
    if "bitsandbytes" in needs and not torch.cuda.is_available():
        try:  # bitsandbytes 0.50 runs its 8-bit optimizers on the CPU; one step on a probe tells for other builds
            import bitsandbytes as bnb

            probe = torch.nn.Parameter(torch.zeros(4096))
            probe.grad = torch.ones(4096)
            bnb.optim.Adam8bit([probe], lr=1e-3).step()
        except Exception as exc:
            raise AlignError(f"trainer.optim={t.optim}: bitsandbytes' 8-bit optimizers cannot run on this CPU "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); use adamw_torch") from None


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs. Run before the model and adapter exist: LoRA's A matrices are drawn at
    creation, before the Trainer seeds, so without this two runs with one seed start from different adapters."""
    from transformers import set_seed

    set_seed(seed)


def drop_training_args(folder: Path) -> None:
    """transformers pickles its TrainingArguments (hub_token, trainer.extra) into every save as
    training_args.bin; resuming never reads it (transformers 5), so it is not shipped with adapters or kept."""
    (Path(folder) / "training_args.bin").unlink(missing_ok=True)


def _checkpoint_scrubber():
    from transformers import TrainerCallback

    class DropTrainingArgs(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                drop_training_args(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return DropTrainingArgs()


def resume_checkpoint(run, out: Path) -> str | None:
    """The last checkpoint under `out` when the `run` section asks to resume, else None."""
    if not run.resume:
        return None
    ckpt = runs.last_checkpoint(out)
    if ckpt is None:
        log.warning("run.resume=true but %s has no checkpoint; starting from scratch", out)
    else:
        log.info("resuming from %s", ckpt)
    return ckpt


def loss_history(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def fit(trainer, cfg, stage: str, out: Path, n_train: int, n_eval: int) -> dict:
    """What every TRL-trained stage does between building its trainer and evaluating: count the rows the trainer
    kept, keep QLoRA's trainables in the compute dtype, train (resuming if asked); the train metrics."""
    kept = count_kept(trainer, cfg.trainer.max_length, stage, n_train, n_eval)
    warn_if_unsharded(trainer, stage)
    restore_trainable_dtype(trainer, cfg.model, cfg.peft)
    if cfg.trainer.shared_prefix:
        share_prefixes(trainer, stage)
    return {**train(trainer, cfg.run, out), **kept, **shared_prefix.metrics(trainer.model)}


def share_prefixes(trainer, stage: str) -> None:
    """Shared-prefix forwards for the trained model and a separate reference model (TRL's fused-head calls; the
    reward model's scores in rm)."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            shared_prefix.enable(model, stage, head="score" if stage == "rm" else "causal")


def warn_if_unsharded(trainer, stage: str) -> None:
    """`accelerate launch` with conf/accelerate/fsdp.yaml on CPU processes: accelerate (1.16) attaches its FSDP plugin
    only to GPU-type process groups, so the run trains data-parallel with the whole model in every process. Correct,
    but not what was asked: say so once."""
    import os

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    got = str(trainer.accelerator.distributed_type)
    if asked and not got.endswith("FSDP") and trainer.is_world_process_zero():
        log.warning("%s: FSDP was asked (ACCELERATE_USE_FSDP=true) but accelerate runs %s here: it shards only on "
                    "GPUs, so each of the %d processes holds the whole model and trains data-parallel", stage,
                    got.split(".")[-1], trainer.accelerator.num_processes)


def train(trainer, run, out: Path) -> dict:
    """Train (resuming if the `run` section asks) and return the train metrics, with the first and last logged loss."""
    trainer.add_callback(_checkpoint_scrubber())
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(run, out))
    metrics = {f"train/{k}": v for k, v in result.metrics.items()}
    losses = loss_history(trainer)
    if losses:
        metrics["train/first_loss"], metrics["train/last_loss"] = losses[0], losses[-1]
    metrics["train/global_step"] = trainer.state.global_step
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]  # TRL's running count
    if tokens and metrics.get("train/train_runtime"):
        metrics["train/tokens_per_second"] = tokens[-1] / metrics["train/train_runtime"]
    return metrics


def save_model(trainer, peft_cfg, out: Path, tokenizer) -> Path:
    """adapter/ for PEFT methods (loadable with AutoPeftModel*), model/ for full fine-tuning, bitfit and freeze."""
    target = Path(out) / ("model" if adapters.saves_full_model(peft_cfg) else "adapter")
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
        drop_training_args(target)
    return target


def finish(trainer, tracker, cfg, out: Path, stage: str, metrics: dict, saved: Path, parents: dict,
           data_fingerprint: str | None, started: float) -> dict:
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    metrics.update(adapters.param_counts(trainer.model))
    metrics["seconds"] = round(time.time() - started, 1)
    if trainer.is_world_process_zero():
        tracker.summary(metrics)
        if cfg.tracking.log_artifacts:
            tracker.artifact(saved, name=f"{cfg.run.name}-{stage}", kind="model")
        runs.finish(out, cfg, stage, metrics, parents=parents, data_fingerprint=data_fingerprint, started=started,
                    extra={"output": str(saved)})
    tracker.finish()
    return metrics


def restore_trainable_dtype(trainer, model_cfg, peft_cfg) -> None:
    """TRL casts QLoRA's trainable weights to bf16 (the QLoRA paper's GPU recipe). With an fp32 compute dtype
    (CPU) that breaks full trainable heads such as the reward model's score layer and slows LoRA, so keep
    trainables in the compute dtype."""
    if not peft_cfg.load_in_4bit:
        return
    dtype = models.pick_dtype(model_cfg.dtype)
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def count_kept(trainer, max_length: int, stage: str, n_train: int, n_eval: int) -> dict:
    """TRL drops rows longer than max_length (reward) or with nothing to learn; never let that pass silently."""
    kept_train = len(trainer.train_dataset)
    kept_eval = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    if kept_train == 0:
        raise AlignError(f"{stage}: all {n_train} training rows were dropped (longer than "
                         f"trainer.max_length={max_length} tokens?); raise trainer.max_length")
    for split, n, kept in (("train", n_train, kept_train), ("eval", n_eval, kept_eval)):
        if kept < n:
            log.warning("%s: %d of %d %s rows were dropped by the trainer (longer than trainer.max_length=%d)",
                        stage, n - kept, n, split, max_length)
    return {"data/train_rows": n_train, "data/train_rows_used": kept_train,
            "data/eval_rows": n_eval, "data/eval_rows_used": kept_eval}


def rows_for_steps(t, rows: list) -> list:
    """The rows one pass of the `trainer` section's max_steps will consume (all of them when training by epochs)."""
    if t.max_steps <= 0:
        return rows
    need = t.max_steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * (
        distributed_state().num_processes)
    return rows[:need]
