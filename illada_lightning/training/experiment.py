"""`run_experiment(cfg)`: pretraining, SFT, or both, with checks first, MLflow tracking and resume.

Order of work:
1. `preflight`: everything that can be wrong is checked before any training step - the strategy on this
   machine, the run directory (a finished or interrupted run is never overwritten silently), `init_from`,
   the tokenizer against the model, every data set of every requested stage (read, tokenised, packed),
   and an SFT set whose every example is longer than `max_seq_len`.
2. Each stage: a Trainer with the shared strategy, checkpoints every N steps and at the end, the plateau
   LR switch (pretraining), the non-finite-loss guard (stop or roll back), throughput logging, MLflow.
3. A few generated answers from the final model (`diffusion.sampler.generate`).

Distributed runs (one process per device) execute this whole function on every rank; files and MLflow
are written by rank 0 only, and ranks meet at barriers where one reads what another wrote.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from ..config import ConfigError, flatten, to_dict, to_yaml
from ..data.config import SFTDataConfig
from .callbacks import LossPlateauLRSwitch, NonFiniteLossError, NonFiniteLossGuard, ThroughputMonitor
from .checkpoint import (
    FINISHED_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    export_model,
    full_model_state,
    last_checkpoint,
    load_init_weights,
    read_finished,
    read_model_checkpoint,
    write_finished,
)
from .config import ExperimentConfig
from .module import DiffusionLMModule, PretrainModule, SFTModule
from .progress import StepProgressBar
from .strategy import check_strategy, make_strategy

log = logging.getLogger(__name__)


class RunDirectoryError(ValueError):
    """The run directory already holds a run that this invocation would overwrite."""


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def stages_of(cfg: ExperimentConfig) -> list[str]:
    return ["pretrain", "sft"] if cfg.stage == "all" else [cfg.stage]


# ----------------------------------------------------------------------------- preflight


def check_run_dir(cfg: ExperimentConfig) -> None:
    """Refuse to write over a finished or interrupted stage unless `resume=auto`."""
    if cfg.resume == "auto":
        return
    run_dir = Path(cfg.resolved_run_dir)
    for stage in stages_of(cfg):
        stage_dir = run_dir / stage
        if read_finished(stage_dir) is not None:
            raise RunDirectoryError(
                f"{stage_dir} already holds a finished {stage} run; pass resume=auto to reuse it "
                f"(finished stages are skipped), or choose a new name=... or run_dir=...")
        ckpts = list((stage_dir / "checkpoints").glob("*.ckpt")) if (stage_dir / "checkpoints").is_dir() else []
        if ckpts:
            raise RunDirectoryError(
                f"{stage_dir} holds an interrupted {stage} run ({len(ckpts)} checkpoint(s)); pass resume=auto "
                f"to continue it, or choose a new name=... or run_dir=...")


def _sft_init_path(cfg: ExperimentConfig) -> str | None:
    """Where SFT's initial weights come from when stage=sft: init_from, else this run's own pretraining."""
    if cfg.init_from:
        return cfg.init_from
    own = Path(cfg.resolved_run_dir) / "pretrain"
    return str(own) if (own / "model.pt").is_file() else None


def resolve_tokenizer(cfg: ExperimentConfig):
    """The run's tokenizer: the run directory's own (resume), the init checkpoint's (SFT), or built from the
    config (loaded from tokenizer.path, or trained on the pretraining corpus and cached)."""
    from ..data.tokenizer import Tokenizer, build_tokenizer, check_tokenizer_compatible
    from .checkpoint import _tokenizer_from_json

    own = Path(cfg.resolved_run_dir) / TOKENIZER_DIR / "tokenizer.json"
    tokenizer = None
    continuing = cfg.resume == "auto" or cfg.stage == "sft"  # a fresh run builds its tokenizer from the config
    if own.is_file() and continuing:
        tokenizer = Tokenizer.load(own)
    elif cfg.stage == "sft" and _sft_init_path(cfg):
        try:
            _, _, tok_json, _ = read_model_checkpoint(_sft_init_path(cfg))
        except CheckpointError as exc:
            raise CheckpointError(f"init_from: {exc}") from None
        tokenizer = _tokenizer_from_json(tok_json) if tok_json else None
    if tokenizer is None and not is_rank_zero() and not cfg.tokenizer.path:
        # Launched by torchrun/SLURM, every rank starts at once: rank 0 trains the tokenizer, the others
        # wait for the file instead of racing it on the shared cache.
        tokenizer = Tokenizer.load(_wait_for(own))
    if tokenizer is None:
        data = cfg.pretrain.data
        tokenizer = build_tokenizer(cfg.tokenizer, data.train_files, fmt=data.format, text_field=data.text_field,
                                    cache_dir=data.cache_dir)
    try:
        check_tokenizer_compatible(tokenizer, cfg.model)
    except ValueError as exc:
        raise ConfigError(f"{exc} (set tokenizer.vocab_size <= model.vocab_size or pick a matching model)") from None
    return tokenizer


def _wait_for(path: Path, timeout_s: float = 3600.0) -> Path:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_zero_only.rank}: {path} did not appear within {timeout_s:.0f}s")
        time.sleep(2.0)
    return path


def check_sft_lengths(sft_cfg: SFTDataConfig, tokenizer, max_seq_len: int) -> None:
    """An SFT set whose every example (prompt + response + EOS) exceeds max_seq_len is a config error."""
    from ..data.sft import load_sft_examples

    split = sft_cfg.multi_turn_split and sft_cfg.masking == "response_only"
    examples = load_sft_examples(sft_cfg.train_files, tokenizer, multi_turn_split=split, cache_dir=sft_cfg.cache_dir)
    lengths = [len(p) + len(r) + 1 for p, r in zip(examples.prompts, examples.responses)]
    if lengths and min(lengths) > max_seq_len:
        raise ConfigError(
            f"every one of the {len(lengths)} SFT examples in {list(sft_cfg.train_files)} is longer than "
            f"max_seq_len={max_seq_len} (shortest: {min(lengths)} tokens with prompt, response and EOS); "
            "raise sft.data.max_seq_len / model.max_seq_len or use shorter examples")


def make_datamodule(cfg: ExperimentConfig, stage: str, tokenizer):
    from ..data.datamodule import PretrainDataModule, SFTDataModule

    if stage == "pretrain":
        return PretrainDataModule(cfg.pretrain.data, tokenizer, cfg.model.max_seq_len, cfg.pretrain.batch_size,
                                  cfg.seed)
    return SFTDataModule(cfg.sft.data, tokenizer, cfg.model.max_seq_len, cfg.sft.batch_size, cfg.seed)


def _max_seq_len(cfg: ExperimentConfig, stage: str) -> int:
    data = cfg.pretrain.data if stage == "pretrain" else cfg.sft.data
    n = data.max_seq_len or cfg.model.max_seq_len
    if n > cfg.model.max_seq_len:
        raise ConfigError(f"{'pretrain' if stage == 'pretrain' else 'sft'}.data.max_seq_len={n} exceeds "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    return n


def preflight(cfg: ExperimentConfig) -> tuple[Any, dict[str, Any]]:
    """All checks that can fail, before training; returns (tokenizer, {stage: prepared datamodule})."""
    check_strategy(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes)
    if is_rank_zero():
        check_run_dir(cfg)
    stages = stages_of(cfg)
    if "sft" in stages and cfg.stage == "sft" and cfg.init_from:
        p = Path(cfg.init_from).expanduser()
        if not p.exists():
            raise CheckpointError(f"init_from={cfg.init_from}: no such file or directory")
        ckpt_cfg, state, _, _ = read_model_checkpoint(p)
        from ..model.build import build_model
        from .checkpoint import check_compatible

        check_compatible(ckpt_cfg, cfg.model, state, build_model(cfg.model, device="meta"), cfg.init_from)
    tokenizer = resolve_tokenizer(cfg)
    datamodules = {}
    for stage in stages:
        n = _max_seq_len(cfg, stage)
        if stage == "sft":
            check_sft_lengths(cfg.sft.data, tokenizer, n)
        dm = make_datamodule(cfg, stage, tokenizer)
        dm.setup("fit")  # reads, tokenises and packs now, so data errors come before training
        datamodules[stage] = dm
    if is_rank_zero():
        tokenizer.save(Path(cfg.resolved_run_dir) / TOKENIZER_DIR)  # next to the checkpoints; other ranks may wait
    return tokenizer, datamodules


# ----------------------------------------------------------------------------- one stage


def _tokenizer_json(tokenizer) -> str:
    return tokenizer.backend.to_str()


def _build_module(cfg: ExperimentConfig, stage: str, lr_scale: float = 1.0) -> DiffusionLMModule:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    cls = PretrainModule if stage == "pretrain" else SFTModule
    module = cls(cfg.model, cfg.diffusion, section.optim, section.schedule, seed=cfg.seed, lr_scale=lr_scale,
                 activation_checkpointing=cfg.activation_checkpointing, sharded_grads=cfg.strategy == "fsdp")
    if cfg.compile:
        module.model.compile_blocks()
    return module


def _devices(value: str):
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def make_trainer(cfg: ExperimentConfig, stage: str, stage_dir: Path, logger, extra_callbacks=()) -> pl.Trainer:
    section = cfg.pretrain if stage == "pretrain" else cfg.sft
    ckpt_dir = stage_dir / "checkpoints"
    every = section.ckpt_every_n_steps
    callbacks: list[Callback] = [
        # Step-named checkpoints, the newest kept, with last.ckpt linking to it (resume=auto reads last.ckpt).
        ModelCheckpoint(dirpath=ckpt_dir, filename="step={step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=every if every > 0 else None, save_top_k=1, save_last="link",
                        save_on_train_epoch_end=False, enable_version_counter=False),
        NonFiniteLossGuard(cfg.on_nan, ckpt_dir),
        ThroughputMonitor(section.log_every_n_steps),
    ]
    if stage == "pretrain":
        callbacks.append(LossPlateauLRSwitch(section.schedule, section.optim.warmup_steps))
    if stage == "sft" and cfg.eval.per_epoch:
        from ..evaluation.callback import PerEpochEvaluation  # the tokenizer comes from trainer.datamodule

        callbacks.append(PerEpochEvaluation(cfg.eval))
    if cfg.progress_bar:
        callbacks.append(StepProgressBar(stage, refresh_rate=max(1, section.log_every_n_steps // 2)))
    callbacks += list(extra_callbacks)
    accumulate = section.accumulate_grad_batches
    val_every = section.val_every_n_steps
    if stage == "pretrain":
        max_steps, max_epochs = section.max_steps, -1
    else:
        max_steps, max_epochs = section.max_steps, section.epochs
    return pl.Trainer(
        accelerator=cfg.accelerator, devices=_devices(cfg.devices), num_nodes=cfg.num_nodes,
        strategy=make_strategy(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes),
        precision=cfg.precision, max_steps=max_steps, max_epochs=max_epochs, max_time=section.max_time,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=section.optim.grad_clip or None, gradient_clip_algorithm="norm",
        # Validation every `val_every` optimizer steps, counted across epochs (0: only the final one below).
        val_check_interval=val_every * accumulate if val_every > 0 else 10**12, check_val_every_n_epoch=None,
        limit_val_batches=section.limit_val_batches or 1.0, num_sanity_val_steps=0,
        log_every_n_steps=section.log_every_n_steps, logger=logger if logger is not None else False,
        callbacks=callbacks, enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False,  # the data modules shard batches over ranks themselves
        default_root_dir=str(stage_dir),
    )


def _callback(trainer: pl.Trainer, cls):
    return next((c for c in trainer.callbacks if isinstance(c, cls)), None)


def _save_final(trainer: pl.Trainer, ckpt_dir: Path) -> Path:
    """Checkpoint the end of training (all ranks) and point last.ckpt at it (rank 0)."""
    path = ckpt_dir / f"step={trainer.global_step:07d}.ckpt"
    if not path.exists():
        trainer.save_checkpoint(path)
    trainer.strategy.barrier("final-checkpoint")
    if trainer.is_global_zero:
        last = ckpt_dir / "last.ckpt"
        tmp = ckpt_dir / "last.ckpt.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path.name, tmp)
        os.replace(tmp, last)
    return path


def _has_val(datamodule) -> bool:
    loader = datamodule.val_dataloader()
    return loader is not None and not (isinstance(loader, list) and not loader)


def _val_loss(results: list[dict]) -> float | None:
    return float(results[0]["val/loss"]) if results and "val/loss" in results[0] else None


def _loss_summary(first: list[tuple[int, float]], recent: list[tuple[int, float]]) -> dict[str, float | None]:
    """First and last training loss, and means over the first and last few micro-batches."""
    if not first or not recent:
        return {"first_loss": None, "last_loss": None}
    k = max(1, min(10, len(first) // 10, len(recent) // 10))
    head, tail = [v for _, v in first[:k]], [v for _, v in recent[-k:]]
    return {"first_loss": first[0][1], "last_loss": recent[-1][1],
            "first_loss_avg": sum(head) / k, "last_loss_avg": sum(tail) / k}


def run_stage(cfg: ExperimentConfig, stage: str, tokenizer, datamodule, tracker=None, extra_callbacks=()) -> dict:
    run_dir = Path(cfg.resolved_run_dir)
    stage_dir = run_dir / stage
    ckpt_dir = stage_dir / "checkpoints"
    finished = read_finished(stage_dir)
    # resume=auto (preflight refused resume=never): a finished stage is skipped, except pretraining asked to
    # run longer (its LR schedule does not depend on max_steps, so the extension continues it exactly).
    extend = (finished is not None and stage == "pretrain" and cfg.pretrain.max_steps > finished["global_step"]
              and last_checkpoint(stage_dir) is not None)
    if finished is not None and not extend:
        log.info("%s: already finished in %s, skipping", stage, stage_dir)
        return {**finished, "skipped": True}
    if extend:
        log.info("pretrain: extending the finished run in %s from step %d to %d", stage_dir,
                 finished["global_step"], cfg.pretrain.max_steps)
        if is_rank_zero():
            (stage_dir / FINISHED_FILE).unlink()
    ckpt_path = last_checkpoint(stage_dir) if cfg.resume == "auto" else None
    module = _build_module(cfg, stage)
    init_path = None
    if stage == "sft" and ckpt_path is None:
        init_path = str(run_dir / "pretrain") if cfg.stage == "all" else _sft_init_path(cfg)
        if init_path is not None:
            _, resolved = load_init_weights(module.model, init_path, cfg.model)
            init_path = str(resolved)
        else:
            log.warning("SFT starts from randomly initialised weights (no init_from and no pretraining in %s)", run_dir)
    module.tokenizer_json = _tokenizer_json(tokenizer)
    logger = tracker.logger(stage) if tracker is not None else None
    if tracker is not None:
        # The full resolved config on every run (the parent has it too), so each run stands on its own.
        tracker.log_stage_params(stage, flatten(to_dict(cfg)))
        tracker.set_tag(stage, "illada.init_from", init_path or "")
        if ckpt_path is not None:
            tracker.set_tag(stage, "illada.resumed_from", str(ckpt_path))

    start = time.perf_counter()
    rollbacks, lr_scale, first_losses = 0, 1.0, None
    initial_val = None
    while True:
        trainer = make_trainer(cfg, stage, stage_dir, logger, extra_callbacks)
        if ckpt_path is None and initial_val is None and _has_val(datamodule):
            # The bound before training, with the same fixed masks as every later evaluation.
            initial_val = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False))
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        first_losses = first_losses if first_losses is not None else list(module.first_losses)
        guard = _callback(trainer, NonFiniteLossGuard)
        if guard.triggered_step is None:
            break
        last = last_checkpoint(stage_dir)
        if cfg.on_nan == "rollback" and last is not None and rollbacks < cfg.max_rollbacks:
            rollbacks += 1
            lr_scale *= cfg.nan_lr_scale
            log.warning("rollback %d/%d to %s with the LR scaled by %g", rollbacks, cfg.max_rollbacks, last, lr_scale)
            if tracker is not None:
                tracker.set_tag(stage, f"illada.rollback_{rollbacks}", f"step {guard.triggered_step} -> {last}, lr x{lr_scale:g}")
            module = _build_module(cfg, stage, lr_scale=lr_scale)
            module.tokenizer_json = _tokenizer_json(tokenizer)
            ckpt_path = last
            continue
        message = guard.message
        if cfg.on_nan == "rollback":
            message = (f"non-finite loss at step {guard.triggered_step} and no rollback left "
                       f"({'no checkpoint yet' if last is None else f'{rollbacks} rollbacks done'}); "
                       "rerun with a lower LR")
        if tracker is not None:
            tracker.set_tag(stage, "illada.stopped", message)
            tracker.terminate(stage, "FAILED")
        raise NonFiniteLossError(message)

    final_ckpt = _save_final(trainer, ckpt_dir)
    val_loss = _val_loss(trainer.validate(module, datamodule=datamodule, verbose=False)) if _has_val(datamodule) else None
    state = full_model_state(trainer, module)
    summary = {
        "stage": stage, "global_step": trainer.global_step, "initial_val_loss": initial_val, "val_loss": val_loss,
        "wall_time_s": time.perf_counter() - start, "tokens_per_s": module.last_throughput,
        "tokens_per_s_mean": _callback(trainer, ThroughputMonitor).mean_tokens_per_s,
        "checkpoint": str(final_ckpt), "export": str(stage_dir / "model.pt"), "rollbacks": rollbacks,
        **_loss_summary(first_losses or [], list(module.recent_losses)),
    }
    switch = _callback(trainer, LossPlateauLRSwitch)
    if switch is not None:
        summary.update(lr_switch_step=switch.switch_step, lr_switch_loss=switch.switch_loss)
    if trainer.is_global_zero:
        export_model(stage_dir / "model.pt", cfg.model, state, module.tokenizer_json,
                     {"stage": stage, "global_step": trainer.global_step})
        write_finished(stage_dir, summary)
        if tracker is not None:
            metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None
                       and not isinstance(v, bool) and math.isfinite(v)}
            tracker.log_metrics(stage, {f"final/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
            if cfg.mlflow.log_checkpoint:
                tracker.log_artifact(stage, stage_dir / "model.pt", "model")
            if cfg.mlflow.log_tokenizer:
                tracker.log_artifacts(stage, run_dir / TOKENIZER_DIR, "tokenizer")
            tracker.terminate(stage)
    trainer.strategy.barrier("export")  # the next stage reads model.pt
    return summary


# ----------------------------------------------------------------------------- generation preview


def preview_prompts(cfg: ExperimentConfig, tokenizer) -> list[str]:
    """Chat-formatted prompts: the configured ones, else the first SFT test (or validation) records."""
    from ..data.corpus import read_jsonl_records, resolve_data_path
    from ..data.sft import record_to_pairs

    if cfg.preview.prompts:
        return [tokenizer.format_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in cfg.preview.prompts[: cfg.preview.num_prompts]]
    files = [str(Path(f).with_name("test.jsonl")) for f in cfg.sft.data.train_files[:1]] + list(cfg.sft.data.val_files)
    for f in files:
        if resolve_data_path(f).is_file():
            records = read_jsonl_records(resolve_data_path(f))[: cfg.preview.num_prompts]
            return [record_to_pairs(r, tokenizer, multi_turn_split=False)[0][0] for _, r in records]
    return []


def preview_answers(cfg: ExperimentConfig, model, tokenizer) -> list[dict[str, str]]:
    from ..diffusion.sampler import generate

    prompts = preview_prompts(cfg, tokenizer)
    if not prompts or cfg.preview.num_prompts == 0:
        return []
    device = next(model.parameters()).device
    model.eval()
    ids = [torch.tensor(tokenizer.encode(p), dtype=torch.long, device=device) for p in prompts]
    p = cfg.preview
    window = cfg.sft.data.max_seq_len or cfg.model.max_seq_len  # the window SFT trained on (null: the model's)
    room = window - max(len(i) for i in ids)
    budget = p.gen_length or max(p.block_length, room // p.block_length * p.block_length)
    steps = p.steps or budget
    outputs = generate(model, ids, steps=steps, gen_length=budget, block_length=p.block_length,
                       variable_length=p.variable_length, max_new_tokens=budget if p.variable_length else None,
                       generator=torch.Generator(device).manual_seed(cfg.seed))
    return [{"prompt": p, "answer": tokenizer.decode(out)} for p, out in zip(prompts, outputs)]


# ----------------------------------------------------------------------------- experiment


def warn_config_drift(cfg: ExperimentConfig, saved: Path) -> list[str]:
    """On resume, name the settings that differ from the run being continued (allowed, but worth seeing)."""
    if cfg.resume != "auto" or not saved.is_file():
        return []
    import yaml

    before = flatten(yaml.safe_load(saved.read_text()) or {})
    now = flatten(to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and k not in ("resume", "progress_bar"))
    if changed:
        log.warning("resume=auto continues %s with changed settings: %s", saved.parent,
                    ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:20]))
    return changed


def run_experiment(cfg: ExperimentConfig, *, extra_callbacks=(), preview: bool = True) -> dict:
    """Run the configured stages; returns a result dict (per-stage summaries, MLflow location, samples)."""
    if cfg.matmul_precision:
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer, datamodules = preflight(cfg)
    run_dir = Path(cfg.resolved_run_dir)
    tracker = None
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        warn_config_drift(cfg, run_dir / "config.yaml")
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if cfg.mlflow.enabled:
            from .tracking import Tracker

            tracker = Tracker(cfg, run_dir)
            tracker.parent_run_id()
            tracker.client.log_artifact(tracker.runs["parent"], str(run_dir / "config.yaml"))
    result: dict[str, Any] = {"run_dir": str(run_dir), "stages": {}}
    for stage in stages_of(cfg):
        result["stages"][stage] = run_stage(cfg, stage, tokenizer, datamodules[stage], tracker, extra_callbacks)
    if tracker is not None:
        tracker.terminate("parent")
        result.update(tracking_uri=tracker.uri, mlflow_runs=dict(tracker.runs),
                      mlflow_experiment=cfg.mlflow.experiment_name)
        from .tracking import ui_command

        result["ui_command"] = ui_command(tracker.uri)
    if preview and is_rank_zero() and "sft" in result["stages"]:
        from .checkpoint import load_checkpoint

        device = "cuda" if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda") else "cpu"
        model, _ = load_checkpoint(run_dir / "sft" / "model.pt", device=device)
        result["samples"] = preview_answers(cfg, model, tokenizer)
    return result
