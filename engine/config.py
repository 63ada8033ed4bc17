"""Typed training configuration: dataclass defaults, one YAML file per experiment, key=value overrides.

Resolution order (later wins):
    1. the dataclass defaults below,
    2. the YAML file given with `--config` (nested sections mirror the dataclasses),
    3. `key=value` overrides on the command line, dotted for nesting: `optim.lr=3e-5 schedule.kind=simul`.

Values from YAML and overrides are checked against the field's annotation (int, float, bool, str,
Optional, list, dict); an unknown key or a wrong type raises `ConfigError` naming the full dotted key and,
when it comes from a file, the file. Override values are parsed as YAML scalars (`3` -> int, `true` ->
bool, `null` -> None, `[1, 2]` -> list), so the same spelling works in the file and on the command line.

The `deepspeed` section is a free-form DeepSpeed JSON (a dict inside the YAML, or a path to a JSON file
beside it); the engine fills the batch, clipping and precision keys from the typed sections so they are
never given twice (a conflicting value is an error).

The resolved config is logged at start and saved as `config.yaml` in the output folder and in every
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from profuser.kernels.params import BACKENDS, MISSING_MASS_MODES

# ----------------------------------------------------------------------------------------------------
# The choice lists of the whole engine, in one place (the loader, the passes and the CLI import them)

MODES = ("infer", "train")  # the order of the schedule's weights (w_infer, w_train)
MODE_ID = {"train": 0, "infer": 1}  # a batch's `mode` column
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # name -> torch dtype name (aliases too)
ADVANTAGES = ("minCE", "avgCE")
ADVANTAGE_LEVELS = ("example", "token")
CE_METRICS = ("per_byte", "per_token")
ALIGN_METHODS = ("offsets", "mined")
NAN_POLICIES = ("error", "drop")
SCHEDULES = ("two_stage", "linear", "simul", "reverse", "train_only", "infer_only")
DECAYS = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key (and file)."""


@dataclass
class ModelConfig:
    student: str = "smollm2-135m-instruct"  # local HF folder or alias (see profuser.engine.models)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed on GPU, else sdpa
    activation_checkpointing: bool = False  # recompute layer activations in backward (less memory)


@dataclass
class DataConfig:
    data_dir: str = "runs/demo/data"  # holds prepared/, teachers/<source>/<mode>/, scores/
    # inference-mode store when it lives in its own folder (e.g. generated for a subset of the prompts);
    # None: the same data_dir as training mode
    infer_data_dir: str | None = None
    sources: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct", "gemma3-270m"])
    k: int = 10  # top-k entries per teacher and token used by the loss
    max_length: int = 128
    micro_batch_size: int = 4  # examples per rank and micro-step, per mode
    advantage: str = "minCE"  # minCE | avgCE
    advantage_level: str = "example"  # example | token
    ce_metric: str = "per_byte"  # per_byte | per_token (MinCE across tokenizers)
    student_as_candidate: bool = True
    shuffle_buffer: int = 256
    align_method: str = "offsets"  # offsets | mined
    nan_policy: str = "error"  # error | drop (rows of the store with non-finite log-probs)


@dataclass
class LossConfig:
    lam: float = 0.9  # L = lam * CE + (1 - lam) * KL(teacher mixture || student)
    temperature: float = 1.0
    softcap: float | None = None  # None: the student's final_logit_softcapping, if its config has one
    missing_mass: str = "renormalize"  # renormalize | tail_bucket
    backend: str = "auto"  # auto | triton | chunked | reference


@dataclass
class ScheduleConfig:
    kind: str = "two_stage"  # two_stage | linear | simul | reverse | train_only | infer_only
    switch_fraction: float = 0.5  # two_stage / reverse: fraction of steps spent in stage 1
    ramp_fraction: float = 1.0  # linear: width of the ramp (fraction of steps), centred on switch_fraction
    stage1: list[float] = field(default_factory=lambda: [1.0, 0.0])  # (w_infer, w_train)
    stage2: list[float] = field(default_factory=lambda: [0.1, 1.0])


@dataclass
class OptimConfig:
    max_steps: int = 40  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0: only at the end and on SIGTERM)
    keep_last: int = 2  # older step checkpoints are deleted
    resume: str = "auto"  # auto: latest in output_dir if any | never | a checkpoint folder
    export: bool = True  # write the final student as a transformers folder (output_dir/final)


@dataclass
class EvalConfig:
    data: str | None = None  # held-out JSONL / Parquet (prompt, response[, system]); None disables eval
    max_examples: int = 64
    every: int = 0  # periodic student eval every N optimizer steps (0: only at the end)
    batch_size: int = 8
    references: bool = True  # final report also evaluates the untouched target and every source
    n_samples: int = 3  # generated samples in the final report
    max_new_tokens: int = 48


@dataclass
class LogConfig:
    every: int = 1  # log a metrics row every N optimizer steps
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class DemoConfig:
    """Sizes of the `profuser demo` pipeline (ignored by `train`)."""

    corpus: str | None = None  # JSONL of {id, prompt, response}; None: the shipped WordNet corpus
    n_train: int = 320  # training-mode examples (teacher-forced on the gold response)
    n_infer: int = 96  # inference-mode prompts (each source generates)
    n_eval: int = 48  # held-out examples for the before/after table
    max_new_tokens: int = 48
    # `profuser score` scorers that vote: embedding similarity to the gold response, and every source as a
    # judge LM (a judge favours its own answers: one judge per source cancels that out)
    scorers: list[str] = field(default_factory=lambda: ["similarity", "judge:smollm2-135m-instruct",
                                                        "judge:gemma3-270m"])


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo/train"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    # DeepSpeed JSON (dict) or a path to one, relative to the YAML file. Default: ZeRO-3.
    deepspeed: dict | str = field(default_factory=lambda: {"zero_optimization": {"stage": 3}})


# ----------------------------------------------------------------------------------------------------
# type checking


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return `value` converted to annotation `tp` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}{key}: expected {_tname(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key}: expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}{key}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{key}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}{key}: unsupported annotation {tp!r}")  # programming error


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _apply(obj: Any, updates: dict, prefix: str, where: str) -> None:
    """Merge a nested mapping into dataclass `obj` in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, f"{key}.", where)
        else:
            setattr(obj, k, _check_value(v, hints[k], key, where))


def _set_dotted(cfg: TrainConfig, dotted: str, value: Any) -> None:
    """Set one dotted key; inside the free-form `deepspeed` dict, missing levels are created."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, p in enumerate(parts[:-1]):
        if isinstance(obj, dict):
            obj = obj.setdefault(p, {})
            continue
        if p == "deepspeed" and isinstance(getattr(obj, p, None), str):
            obj.deepspeed = load_deepspeed_json(obj.deepspeed)
        if not hasattr(obj, p) or not (dataclasses.is_dataclass(getattr(obj, p)) or p == "deepspeed"):
            raise ConfigError(f"override {dotted}: unknown key {'.'.join(parts[: i + 1])!r}")
        obj = getattr(obj, p)
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:
        prefix = ".".join(parts[:-1])
        _apply(obj, {parts[-1]: value}, f"{prefix}." if prefix else "", "override ")


def load_deepspeed_json(path: str, base: Path | None = None) -> dict:
    p = Path(path)
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_file():
        raise ConfigError(f"deepspeed: DeepSpeed JSON file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {p} is not valid JSON: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file <- `key=value` overrides. Raises ConfigError naming the bad key."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _apply(cfg, raw, "", f"{path}: ")
        if isinstance(cfg.deepspeed, str):
            cfg.deepspeed = load_deepspeed_json(cfg.deepspeed, path.parent)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(cfg, key.strip(), value)
    if isinstance(cfg.deepspeed, str):
        cfg.deepspeed = load_deepspeed_json(cfg.deepspeed)
    validate(cfg)
    return cfg


_CHOICES = {
    "model.dtype": tuple(DTYPES),
    "data.advantage": ADVANTAGES,
    "data.advantage_level": ADVANTAGE_LEVELS,
    "data.ce_metric": CE_METRICS,
    "data.align_method": ALIGN_METHODS,
    "data.nan_policy": NAN_POLICIES,
    "loss.missing_mass": MISSING_MASS_MODES,
    "loss.backend": BACKENDS,
    "schedule.kind": SCHEDULES,
    "optim.decay": DECAYS,
}


def validate(cfg: TrainConfig) -> None:
    """Value checks that types alone cannot express; each error names the key."""
    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v not in choices:
            raise ConfigError(f"{key}: {v!r} is not one of {', '.join(choices)}")
    positive = {
        "optim.max_steps": cfg.optim.max_steps, "optim.grad_accum": cfg.optim.grad_accum,
        "data.micro_batch_size": cfg.data.micro_batch_size, "data.k": cfg.data.k,
        "data.max_length": cfg.data.max_length, "eval.batch_size": cfg.eval.batch_size,
        "log.every": cfg.log.every,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    for key, v in {"optim.warmup_steps": cfg.optim.warmup_steps, "checkpoint.every": cfg.checkpoint.every,
                   "eval.every": cfg.eval.every, "checkpoint.keep_last": cfg.checkpoint.keep_last}.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if not 0.0 <= cfg.loss.lam <= 1.0:
        raise ConfigError(f"loss.lam: must be in [0, 1], got {cfg.loss.lam}")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"loss.temperature: must be > 0, got {cfg.loss.temperature}")
    if not 0.0 <= cfg.schedule.switch_fraction <= 1.0:
        raise ConfigError(f"schedule.switch_fraction: must be in [0, 1], got {cfg.schedule.switch_fraction}")
    if not 0.0 <= cfg.schedule.ramp_fraction <= 1.0:
        raise ConfigError(f"schedule.ramp_fraction: must be in [0, 1], got {cfg.schedule.ramp_fraction}")
    for key in ("stage1", "stage2"):
        w = getattr(cfg.schedule, key)
        if len(w) != 2 or min(w) < 0:
            raise ConfigError(f"schedule.{key}: expected two non-negative weights [w_infer, w_train], got {w}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two values, got {cfg.optim.betas}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not cfg.data.sources:
        raise ConfigError("data.sources: at least one source is needed")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(f"checkpoint.resume: {cfg.checkpoint.resume} does not exist (use auto, never or a path)")
    stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: must be 0-3, got {stage!r}")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig()
    _apply(cfg, d, "", "")
    return cfg
