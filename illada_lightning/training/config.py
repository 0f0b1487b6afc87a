"""Typed configuration of a training experiment (pretraining, SFT, or both), read by `load_config`.

    cfg = load_config(TrainingConfig, "experiments/configs/default.yaml", ["stage=pretrain", "model=small"])

Defaults follow the iLLaDA 8B recipe where the paper gives a value (§2.1-2.2: AdamW, weight decay 0.1,
pretraining peak 2e-4 / minimum 5e-6, SFT peak 5e-6 / minimum 5e-7 with decay over the last 10%); the
YAML files under `experiments/configs/` set what a smaller run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..data.config import DataConfig, SFTDataConfig, TokenizerConfig
from ..diffusion.config import DiffusionConfig
from ..diffusion.sampler_config import SamplerConfig
from ..model.config import PRESETS, ModelConfig
from ..model.lora_config import LoraConfig
from .checkpointing import parse_checkpointing

STAGES = ("pretrain", "sft", "all")
STRATEGIES = ("auto", "ddp", "fsdp")
# sync: the loss, gradients and weights checked on the host every step (a host sync each);
# deferred: checked on the device, a non-finite update skipped inside the fused AdamW, read a step later.
NAN_CHECKS = ("sync", "deferred")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class OptimConfig:
    """AdamW (iLLaDA §2.1-2.2: weight decay 0.1), warmup and gradient clipping."""

    lr: float = 2e-4  # peak LR (iLLaDA 8B pretraining)
    min_lr: float = 5e-6  # floor reached by the decay
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 2000
    fused: bool | None = None  # None: fused AdamW exactly when the parameters are on CUDA

    # `check`, not `validate`: the loader validates children first, and only the parent knows the key prefix.
    def check(self, where: str) -> OptimConfig:
        _need(self.lr > 0, f"{where}.lr must be positive, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, f"{where}.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _need(self.weight_decay >= 0, f"{where}.weight_decay must be >= 0, got {self.weight_decay}")
        _need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"{where}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _need(self.eps > 0, f"{where}.eps must be positive, got {self.eps}")
        _need(self.grad_clip >= 0, f"{where}.grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        _need(self.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        return self


@dataclass
class ScheduleConfig:
    """When the pretraining LR leaves its plateau, and how the SFT LR ends.

    Pretraining (iLLaDA §2.1): constant after warmup until the smoothed training loss has not improved by
    `min_delta` for `patience` steps (watched only after `min_steps`), then cosine decay over `decay_steps`.
    `switch_at_step` forces the switch at a known step (reproducing a run) and disables the detector;
    `plateau_switch=false` keeps the LR constant unless `switch_at_step` is set.
    SFT (iLLaDA §2.2): linear decay over the last `decay_fraction` of the steps.
    """

    plateau_switch: bool = True
    smoothing: str = "ema"  # "ema" (exponential moving average) or "window" (mean of the last `window` losses)
    ema_decay: float = 0.98
    window: int = 100
    patience: int = 500  # optimizer steps without an improvement of the smoothed loss
    # Absolute improvement of the smoothed loss that resets the patience counter; keep it above the noise of
    # the smoothed loss, or random new minima keep postponing the switch.
    min_delta: float = 0.01
    min_steps: int = 0  # start watching only after this step (and never before warmup ends)
    decay_steps: int = 10_000  # cosine horizon after the switch
    switch_at_step: int | None = None
    decay_fraction: float = 0.1  # SFT only

    def check(self, where: str) -> ScheduleConfig:
        _need(self.smoothing in ("ema", "window"), f"{where}.smoothing must be 'ema' or 'window', got {self.smoothing!r}")
        _need(0 <= self.ema_decay < 1, f"{where}.ema_decay must be in [0, 1), got {self.ema_decay}")
        _need(self.window >= 1, f"{where}.window must be >= 1, got {self.window}")
        _need(self.patience >= 1, f"{where}.patience must be >= 1, got {self.patience}")
        _need(self.min_delta >= 0, f"{where}.min_delta must be >= 0, got {self.min_delta}")
        _need(self.min_steps >= 0, f"{where}.min_steps must be >= 0, got {self.min_steps}")
        _need(self.decay_steps >= 1, f"{where}.decay_steps must be >= 1, got {self.decay_steps}")
        _need(self.switch_at_step is None or self.switch_at_step >= 0,
              f"{where}.switch_at_step must be >= 0 or null, got {self.switch_at_step}")
        _need(0 <= self.decay_fraction <= 1, f"{where}.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        return self


@dataclass
class LoopConfig:
    """What pretraining and SFT share: batch, accumulation, logging, validation and checkpoint cadence."""

    batch_size: int = 8  # rows per device per micro-batch
    accumulate_grad_batches: int = 1
    val_every_n_steps: int = 500  # optimizer steps between validations (0: only at the end)
    limit_val_batches: int = 50  # validation batches per evaluation (0: all)
    ckpt_every_n_steps: int = 1000  # optimizer steps between checkpoints (0: only at the end)
    # Step checkpoints kept (the newest); >= 2 so a rollback or a resume has an older one to fall back to.
    ckpt_keep: int = 2
    log_every_n_steps: int = 10
    max_time: str | None = None  # wall-clock cap "DD:HH:MM:SS"; the stage then ends normally (checkpoint, export)

    def _validate_loop(self, where: str) -> None:
        _need(self.batch_size >= 1, f"{where}.batch_size must be >= 1, got {self.batch_size}")
        _need(self.accumulate_grad_batches >= 1,
              f"{where}.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        for key in ("val_every_n_steps", "limit_val_batches", "ckpt_every_n_steps"):
            _need(getattr(self, key) >= 0, f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        _need(self.ckpt_keep >= 1, f"{where}.ckpt_keep must be >= 1, got {self.ckpt_keep}")
        _need(self.log_every_n_steps >= 1, f"{where}.log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if self.max_time is not None:
            parts = self.max_time.split(":")
            _need(len(parts) == 4 and all(p.isdigit() for p in parts),
                  f"{where}.max_time must look like DD:HH:MM:SS, got {self.max_time!r}")


@dataclass
class PretrainConfig(LoopConfig):
    data: DataConfig = field(default_factory=DataConfig)
    max_steps: int = 1000
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> PretrainConfig:
        self._validate_loop("pretrain")
        _need(self.max_steps >= 1, f"pretrain.max_steps must be >= 1, got {self.max_steps}")
        self.optim.check("pretrain.optim")
        self.schedule.check("pretrain.schedule")
        return self


def _sft_optim() -> OptimConfig:
    # iLLaDA §2.2: warmup to 5e-6, constant, linear decay to 5e-7 over the last 10% of SFT.
    return OptimConfig(lr=5e-6, min_lr=5e-7, warmup_steps=50)


@dataclass
class SFTConfig(LoopConfig):
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    epochs: int = 12  # iLLaDA fine-tunes for 12 epochs
    max_steps: int = -1  # > 0 caps the run (the LR schedule then ends at max_steps)
    optim: OptimConfig = field(default_factory=_sft_optim)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: low-rank adapters, base weights frozen

    def validate(self) -> SFTConfig:
        self._validate_loop("sft")
        _need(self.epochs >= 1, f"sft.epochs must be >= 1, got {self.epochs}")
        _need(self.max_steps == -1 or self.max_steps >= 1, f"sft.max_steps must be -1 or >= 1, got {self.max_steps}")
        self.optim.check("sft.optim")
        self.schedule.check("sft.schedule")
        self.lora.check("sft.lora")
        return self


@dataclass
class MLflowConfig:
    """Where runs are tracked. `tracking_uri=null`: a local SQLite store `sqlite:///<runs_root>/mlflow.db`
    (MLflow 3's recommended default backend) with artifacts under `<runs_root>/mlartifacts`."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment_name: str = "illada-lightning"
    artifact_location: str | None = None  # default: <runs_root>/mlartifacts (new experiments only)
    log_checkpoint: bool = True  # upload the exported final model as an artifact
    log_tokenizer: bool = True
    # MLflow's system metrics (`system/*`: GPU utilisation and memory, CPU, memory, disk, network) on each stage
    # run, sampled every 10 s by default (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL): auto = on for GPU runs.
    system_metrics: str = "auto"  # auto | true | false

    def validate(self) -> MLflowConfig:
        self.system_metrics = str(self.system_metrics).lower()
        _need(self.system_metrics in ("auto", "true", "false"),
              f"mlflow.system_metrics must be auto, true or false, got {self.system_metrics!r}")
        return self


@dataclass
class PreviewConfig:
    """The few answers printed after SFT (through `diffusion.sampler.generate`)."""

    num_prompts: int = 3
    prompts: list[str] = field(default_factory=list)  # empty: the first test/validation prompts
    # `preview.sampler.*`: iLLaDA §2.3 block-by-block generation that stops at EOS (the matching decoder for
    # whole_window SFT). The budget is cut to what the model was trained for, the SFT window less the longest
    # prompt, by the rule generate and evaluate use (budget.py: fit_sampler), so this default may ask for more.
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(
        steps=256, gen_length=256, block_length=8, variable_length=True))


@dataclass
class TrainingConfig:
    name: str = "default"
    stage: str = "all"  # pretrain | sft | all (pretrain, then SFT from its final weights)
    seed: int = 1234
    runs_root: str = "runs"
    run_dir: str | None = None  # default: <runs_root>/<name>
    model: ModelConfig = field(default_factory=lambda: replace(PRESETS["tiny"]))
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    init_from: str | None = None  # stage=sft/pretrain starts from this run dir, checkpoint or HF directory
    resume: str = "never"  # never | auto (continue from the last checkpoint in the run directory)
    on_nan: str = "stop"  # stop | rollback (reload the last checkpoint, LR * nan_lr_scale)
    nan_lr_scale: float = 0.5
    max_rollbacks: int = 3
    # Hardware and distribution (Lightning Trainer arguments).
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("2") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    precision: str = "32-true"  # bf16-mixed on GPU
    # none|full|mlp|N (first N blocks); true = full, false = none (training/checkpointing.py)
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each Transformer block (MaskPredictor.compile_blocks)
    float8: bool = False  # torchao float8 linears in the blocks (training/float8.py; GPUs with sm_89+)
    nan_check: str = "sync"  # sync | deferred (see NAN_CHECKS)
    fsdp_cpu_offload: bool = False  # strategy=fsdp on GPU: parameters, gradients, optimizer state in host memory
    # Under SLURM: SIGUSR1 (`#SBATCH --signal=USR1@90`) saves the step, then `scontrol requeue`s the job, which
    # resumes (needs resume=auto; training/slurm.py). false: SIGUSR1 saves and stops, like SIGTERM.
    slurm_requeue: bool = True
    matmul_precision: str | None = None  # torch.set_float32_matmul_precision ("high" on GPUs)
    progress_bar: bool = True
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    def validate(self) -> TrainingConfig:
        _need(bool(self.name) and "/" not in self.name, f"name must be a non-empty name without '/', got {self.name!r}")
        _need(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        _need(self.resume in ("never", "auto"), f"resume must be 'never' or 'auto', got {self.resume!r}")
        _need(self.on_nan in ("stop", "rollback"), f"on_nan must be 'stop' or 'rollback', got {self.on_nan!r}")
        _need(0 < self.nan_lr_scale < 1, f"nan_lr_scale must be in (0, 1), got {self.nan_lr_scale}")
        _need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _need(self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}")
        _need(self.matmul_precision in (None, "highest", "high", "medium"),
              f"matmul_precision must be highest|high|medium or null, got {self.matmul_precision!r}")
        _need(self.nan_check in NAN_CHECKS, f"nan_check must be one of {NAN_CHECKS}, got {self.nan_check!r}")
        if self.nan_check == "deferred":
            for where, optim in (("pretrain", self.pretrain.optim), ("sft", self.sft.optim)):
                _need(optim.fused is not False and (optim.fused or self.accelerator not in ("cpu",)),
                      f"nan_check=deferred skips a non-finite update inside the fused AdamW: set "
                      f"{where}.optim.fused=true (or null on GPU), got {optim.fused}")
        try:
            parse_checkpointing(self.activation_checkpointing, self.model.n_layers)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if self.init_from is not None:
            _need(self.stage in ("sft", "pretrain"), "init_from is for stage=sft or stage=pretrain (continued "
                  f"pretraining; stage=all chains its own runs), got stage={self.stage}")
        return self

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"{self.runs_root.rstrip('/')}/{self.name}"
