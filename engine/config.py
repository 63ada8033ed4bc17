"""Typed training configuration: dataclass defaults, one YAML file per experiment, key=value overrides.

Resolution order (later wins), the same for every command (config_tree.merge + build; config_cli generates
each command's flags and hands them there):
    1. the dataclass defaults below,
    2. the YAML file given with `--config` (nested sections mirror the dataclasses),
    3. the generated flags (`--optim.lr 3e-5`),
    4. `key=value` overrides on the command line, dotted for nesting: `optim.lr=3e-5 schedule.kind=simul`.

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
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from profuser.kernels.params import BACKENDS, MISSING_MASS_MODES

from .config_tree import ConfigError, build, merge

# ----------------------------------------------------------------------------------------------------
# The choice lists of the whole engine, in one place (the loader, the passes and the CLI import them)

MODES = ("infer", "train")  # the order of the schedule's weights (w_infer, w_train)
MODE_ID = {m: i for i, m in enumerate(MODES)}  # a batch's `mode` column, a row of the step's mode statistics
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # name -> torch dtype name (aliases too)
ADVANTAGES = ("minCE", "avgCE")
ADVANTAGE_LEVELS = ("example", "token")
CE_METRICS = ("per_byte", "per_token")
ALIGN_METHODS = ("offsets", "mined")
SPAN_RULES = ("first_piece", "chain")  # a student token spanning several teacher tokens (loader/spans.py)
# teacher-vocabulary -> student-vocabulary maps (text/vocab_map.py); "+stats" needs corpus counts: API only
VOCAB_MAPS = ("projection", "exact", "exact+mined", "projection+mined")
TEACHER_ENGINES = ("hf", "vllm")  # teach / generate: transformers (default) or vLLM (passes/vllm_engine.py)
NAN_POLICIES = ("error", "drop")  # teach / generate: a NaN from the model (error, or store the row marked)
BAD_ROW_POLICIES = ("error", "drop")  # readers: an invalid stored row (error naming it, or drop and count)
SCHEDULES = ("two_stage", "linear", "simul", "reverse", "train_only", "infer_only", "sft")
DECAYS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # log.report_to (trainer/trackers.py)


@dataclass
class LoraConfig:
    """A LoRA adapter (peft) trained instead of every parameter: the target with r > 0."""

    r: int = 0  # adapter rank; 0: no adapter, every parameter trains
    alpha: float = 16.0  # scaling alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    # the modules that get an adapter (names of the target's linear layers)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # merged: the target with the adapter folded in (a plain transformers folder) | adapter: the PEFT adapter
    # alone (adapter_config.json + weights; profuser loads it on its base, PeftModel.from_pretrained too)
    export: str = "merged"


@dataclass
class ModelConfig:
    student: str = "smollm2-135m-instruct"  # local HF folder, hub id or alias (see profuser.engine.models)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto: flash_attention_2 when installed on GPU, else sdpa
    activation_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    lora: LoraConfig = field(default_factory=LoraConfig)  # model.lora.r > 0 trains a LoRA adapter only


@dataclass
class DataConfig:
    """The data section of training and the streaming loader's options (loader.FusionLoader takes it)."""

    data_dir: str = "runs/demo/data"  # holds prepared/, teachers/<source>/<mode>/, scores/
    # inference-mode store when it lives in its own folder (e.g. generated for a subset of the prompts);
    # None: the same data_dir as training mode
    infer_data_dir: str | None = None
    sources: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct", "gemma3-270m"])  # store names
    k: int | None = 10  # top-k entries per teacher and token used by the loss (None: the smallest stored k)
    max_length: int = 128  # prompt + response tokens per example (the response is truncated to fit)
    micro_batch_size: int = 4  # examples per rank and micro-step, per mode
    # tokens per rank, micro-step and mode instead: examples are added while their tokens fit (an example
    # longer than the budget is a micro-batch of its own); 0: micro_batch_size examples
    micro_batch_tokens: int = 0
    # pack a micro-batch's whole examples into rows (position_ids restart per example, attention stays inside
    # each example: loader/packing.py, checked on the run's model at start: trainer/packing_check.py) instead
    # of one padded row per example; never more positions than padding, the same gradients
    packing: bool = True
    max_tokens_per_row: int = 0  # packing: tokens per row (0: max_length)
    pad_to_multiple_of: int = 8  # a batch's length is rounded up to a multiple of this
    drop_last: bool = False  # drop the last incomplete batch of an epoch
    advantage: str = "minCE"  # minCE | avgCE
    advantage_level: str = "example"  # example | token
    ce_metric: str = "per_byte"  # per_byte | per_token (MinCE across tokenizers)
    student_as_candidate: bool = True  # a source that is the student itself may win MinCE
    shuffle_buffer: int = 256  # examples shuffled together (0: store order)
    align_method: str = "offsets"  # offsets | mined
    # where the student's token spans several teacher tokens: first_piece (the top-k at the first teacher
    # token, projected) | chain (the teacher's chain-rule probability of the string, and no candidate on a
    # byte-fallback piece the student does not emit there; a closer target, 0.001 bits/byte worse in the
    # demo study: docs/results.md)
    span_rule: str = "first_piece"
    # projection: a teacher token -> the student token emitted first for its text | exact | exact+mined
    vocab_map: str = "projection"
    # error | drop: an invalid teacher row (NaN, impossible log-probs or ids, an edited prompt, ...)
    bad_row_policy: str = "error"
    # hf | vllm: the engine `profuser demo` runs teach / generate with (both write the same store)
    teacher_engine: str = "hf"

    def store_dir(self, mode: str) -> tuple[str, Path]:
        """(config key, folder) of the stores of `mode`: infer_data_dir for inference mode when set."""
        if mode == "infer" and self.infer_data_dir:
            return "data.infer_data_dir", Path(self.infer_data_dir)
        return "data.data_dir", Path(self.data_dir)


@dataclass
class LossConfig:
    lam: float = 0.9  # L = lam * CE + (1 - lam) * KL(teacher mixture || student)
    temperature: float = 1.0  # KD temperature on both the student and the fused teacher
    softcap: float | None = None  # None: the student's final_logit_softcapping, if its config has one
    missing_mass: str = "renormalize"  # renormalize | tail_bucket
    backend: str = "auto"  # auto | triton | chunked | reference


@dataclass
class ScheduleConfig:
    kind: str = "two_stage"  # two_stage | linear | simul | reverse | train_only | infer_only | sft
    switch_fraction: float = 0.5  # two_stage / reverse: fraction of steps spent in stage 1
    ramp_fraction: float = 1.0  # linear: width of the ramp (fraction of steps), centred on switch_fraction
    stage1: list[float] = field(default_factory=lambda: [1.0, 0.0])  # (w_infer, w_train)
    stage2: list[float] = field(default_factory=lambda: [0.1, 1.0])  # (w_infer, w_train) after the switch


@dataclass
class OptimConfig:
    max_steps: int = 40  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 2e-5  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup from 0 to lr
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW weight decay (not on norms and biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW eps
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps (0: only at the end and on SIGTERM)
    keep_last: int = 2  # older step checkpoints are deleted
    resume: str = "auto"  # auto: latest in output_dir if any | never | a checkpoint folder
    # resume from a checkpoint of another configuration, or one not written by profuser (its pickles could
    # run code: only for a folder you trust)
    allow_foreign: bool = False
    # resume although the stores, the vote or a vocabulary map differ from those the checkpoint trained on
    allow_changed_data: bool = False
    export: bool = True  # write the final student as a transformers folder (output_dir/final)
    export_dir: str | None = None  # where the export goes (None: output_dir/final)
    export_dtype: str = "float32"  # float32 | bfloat16 | float16: the exported weights' dtype (training is unchanged)


@dataclass
class EvalConfig:
    data: str | None = None  # held-out JSONL / Parquet (prompt, response[, system]); None disables eval
    # validation pairs (never the test set): scored every `every` steps and at the end, and the export is the
    # student of the step with the lowest validation bits/byte (early stopping; final/selected.json says which)
    validation: str | None = None
    max_examples: int = 64  # held-out examples evaluated
    every: int = 0  # periodic student eval every N optimizer steps (0: only at the end)
    batch_size: int = 8  # evaluation batch size
    references: bool = True  # final report also evaluates the untouched target and every source
    n_samples: int = 3  # generated samples in the final report
    max_new_tokens: int = 48  # generated sample length in the report


@dataclass
class LogConfig:
    every: int = 1  # log a metrics row every N optimizer steps
    # trackers every metrics row also goes to: tensorboard (output_dir/tensorboard) | wandb | mlflow
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "profuser"  # the W&B project / the MLflow experiment
    run_name: str | None = None  # the tracker run's name (None: the output folder's name)
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class SpecialistConfig:
    """A source the demo makes itself: `base` fine-tuned (sft) on the demo's gold pairs before the sources teach."""

    base: str | None = None  # the model to fine-tune (alias or folder); None: no specialist
    out: str = "runs/demo/specialist"  # its export folder: name it in data.sources (and as a judge: scorer)
    max_steps: int = 40  # optimizer steps of its sft run (the validation set picks the exported one)
    lr: float = 1.0e-4  # its peak learning rate


@dataclass
class DemoConfig:
    """Sizes of the `profuser demo` pipeline (ignored by `train`). The corpus is split, in order, into the
    gold pairs, the pool, the validation pairs, and (its tail) the out-of-pool test pairs."""

    corpus: str | None = None  # JSONL of {id, prompt, response}; None: the shipped WordNet corpus
    n_train: int = 256  # gold pairs: training mode (teacher-forced on the gold response), the specialist's sft
    # the pool: prompts WITHOUT gold answers, disjoint from the gold pairs (inference mode: the sources
    # answer, the scorers vote, the target learns from the winners); their answers are never stored
    n_pool: int = 96
    # the pool's last prompts whose gold answers are kept aside as a test set (transductive: their prompts
    # and the sources' answers were trained on, never their gold answers)
    n_test_pool: int = 0
    n_val: int = 0  # validation pairs outside the pool: pick every run's exported step (eval.validation)
    n_eval: int = 48  # out-of-pool test pairs (the corpus tail, never trained on): the final table
    max_new_tokens: int = 48  # generated answer length of the inference-mode pass
    # `profuser score` scorers that vote on the pool's answers: the sources other than the target as judge LMs
    # (the target does not judge its own teachers); `similarity` needs gold answers, which a pool has not
    scorers: list[str] = field(default_factory=lambda: ["judge:smollm2-135m-instruct"])
    specialist: SpecialistConfig = field(default_factory=SpecialistConfig)
    # runs trained beside the demo's own, same config, for the final table (engine/tools/demo.py BASELINES):
    # sft (plain fine-tuning on the gold pairs), train_only (FuseLLM), seqkd (sequence-level distillation:
    # CE on the pool winners' answers, then on the gold pairs, no KL)
    baselines: list[str] = field(default_factory=lambda: ["sft", "train_only"])


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo/train"  # the run's own folder: config, metrics, checkpoints/, final/, report/
    seed: int = 0  # model init, data order, dropout (each rank adds its rank)
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



def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                flags: list[tuple[str, Any, str]] = ()) -> TrainConfig:
    """Defaults <- YAML file (a path or a shipped config's name) <- generated flags <- `key=value` overrides,
    through `merge` as every command; then the range checks. Raises ConfigError naming the bad key."""
    def deepspeed_json(tree: dict, base: Path | None) -> None:
        # the free-form DeepSpeed dict: a JSON path is read before dotted overrides edit it, and an override
        # such as deepspeed.zero_optimization.stage=2 edits the default dict rather than replacing it
        if isinstance(tree.get("deepspeed"), str):
            tree["deepspeed"] = load_deepspeed_json(tree["deepspeed"], base)
        if "deepspeed" not in tree and any(i.startswith("deepspeed.") for i in [*overrides, *(k for k, *_ in flags)]):
            tree["deepspeed"] = TrainConfig().deepspeed

    tree, origins = merge(path, flags, list(overrides), prepare=deepspeed_json)
    cfg = build(TrainConfig, tree, origins)
    if isinstance(cfg.deepspeed, str):  # `deepspeed=path.json` on the command line
        cfg.deepspeed = load_deepspeed_json(cfg.deepspeed)
    validate(cfg, origins)
    return cfg


_CHOICES = {
    "model.dtype": tuple(DTYPES),
    "data.advantage": ADVANTAGES,
    "data.advantage_level": ADVANTAGE_LEVELS,
    "data.ce_metric": CE_METRICS,
    "data.align_method": ALIGN_METHODS,
    "data.span_rule": SPAN_RULES,
    "data.vocab_map": VOCAB_MAPS,
    "data.bad_row_policy": BAD_ROW_POLICIES,
    "data.teacher_engine": TEACHER_ENGINES,
    "loss.missing_mass": MISSING_MASS_MODES,
    "loss.backend": BACKENDS,
    "schedule.kind": SCHEDULES,
    "optim.decay": DECAYS,
    "checkpoint.export_dtype": ("float32", "bfloat16", "float16"),
    "model.lora.export": ("merged", "adapter"),
    "log.report_to": TRACKERS,
}


@dataclass(frozen=True)
class _Range:
    """[lo, hi] with open ends where said; every value must also be a finite number."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        return math.isfinite(v) and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) \
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self) -> str:
        lo = "(-inf" if self.lo is None else f"{'(' if self.lo_open else '['}{self.lo:g}"
        hi = "inf)" if self.hi is None else f"{self.hi:g}{')' if self.hi_open else ']'}"
        return f"{lo}, {hi}"


_POS, _NONNEG, _UNIT = _Range(0, lo_open=True), _Range(0), _Range(0, 1)
_RANGES = {  # every numeric option; list options apply the range to each entry
    "optim.max_steps": _Range(1), "optim.grad_accum": _Range(1), "optim.warmup_steps": _NONNEG,
    "optim.lr": _POS, "optim.eps": _POS, "optim.betas": _Range(0, 1, hi_open=True),
    "optim.weight_decay": _NONNEG, "optim.grad_clip": _NONNEG, "optim.min_lr_ratio": _UNIT,
    "data.micro_batch_size": _Range(1), "data.k": _Range(1), "data.max_length": _Range(2),
    "data.pad_to_multiple_of": _Range(1), "data.micro_batch_tokens": _NONNEG, "data.max_tokens_per_row": _NONNEG,
    "data.shuffle_buffer": _NONNEG, "loss.lam": _UNIT, "loss.temperature": _POS, "loss.softcap": _POS,
    "schedule.switch_fraction": _UNIT, "schedule.ramp_fraction": _UNIT, "schedule.stage1": _NONNEG,
    "schedule.stage2": _NONNEG, "checkpoint.every": _NONNEG, "checkpoint.keep_last": _NONNEG,
    "eval.max_examples": _Range(1), "eval.every": _NONNEG, "eval.batch_size": _Range(1),
    "eval.n_samples": _NONNEG, "eval.max_new_tokens": _Range(1), "log.every": _Range(1),
    "demo.n_train": _Range(1), "demo.n_pool": _Range(1), "demo.n_eval": _Range(1), "demo.n_val": _NONNEG,
    "demo.n_test_pool": _NONNEG, "demo.max_new_tokens": _Range(1), "demo.specialist.max_steps": _Range(1),
    "demo.specialist.lr": _POS, "model.lora.r": _NONNEG, "model.lora.alpha": _POS, "model.lora.dropout": _UNIT,
}
_LENGTHS = {"optim.betas": 2, "schedule.stage1": 2, "schedule.stage2": 2}


def check_section(cfg: Any, section: str, origins: dict | None = None) -> None:
    """The choice and range checks of one section (`cfg` is that section's dataclass, e.g. a DataConfig that
    the loader was handed directly); ConfigError naming `section.key` and where its value came from."""
    origins = origins or {}

    def fail(key, msg):
        raise ConfigError(f"{origins.get(key, '')}{key}: {msg}")

    def value(key):  # the value of `key` (section.name or section.sub.name) when it is in this section
        sec, *path = key.split(".")
        if sec != section:
            return None
        obj = cfg
        for name in path:
            obj = getattr(obj, name)
        return obj

    for key, choices in _CHOICES.items():
        v = value(key) if key.split(".")[0] == section else None
        for x in (v if isinstance(v, list) else [v] if key.split(".")[0] == section else []):
            if x not in choices:  # a list option: each entry
                fail(key, f"{x!r} is not one of {', '.join(choices)}" + (f" (in {v})" if isinstance(v, list) else ""))
    for key, rng in _RANGES.items():
        v = value(key)
        if v is None:
            continue
        if key in _LENGTHS and len(v) != _LENGTHS[key]:
            fail(key, f"expected {_LENGTHS[key]} values, got {v}")
        for x in (v if isinstance(v, list) else [v]):
            if not rng.ok(float(x)):
                fail(key, f"must be in {rng}, got {x!r}" + (f" (in {v})" if isinstance(v, list) else ""))
    if section == "data":
        if isinstance(cfg.sources, str) or not cfg.sources:
            fail("data.sources", f"at least one source name is needed (a list), got {cfg.sources!r}")
        if len(set(cfg.sources)) != len(cfg.sources):
            fail("data.sources", f"has duplicates: {cfg.sources}")


def validate(cfg: TrainConfig, origins: dict | None = None) -> None:
    """Every value check that types cannot express, before anything else runs; each error names the key and
    where the value came from (the YAML file, a flag or `override`)."""
    origins = origins or {}

    def fail(key, msg):
        raise ConfigError(f"{origins.get(key, '')}{key}: {msg}")

    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            check_section(getattr(cfg, f.name), f.name, origins)
    problem = output_dir_problem(cfg.output_dir)
    if problem:
        fail("output_dir", f"{cfg.output_dir!r} {problem}")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        fail("checkpoint.resume", f"{cfg.checkpoint.resume} does not exist (use auto, never or a path)")
    stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        fail("deepspeed.zero_optimization.stage", f"must be 0-3, got {stage!r}")


def output_dir_problem(output_dir: str) -> str | None:
    """Why `output_dir` can never be a run's folder (None: it can): empty, or a folder that holds other things
    by nature (the current folder, its parent, the filesystem root, the home folder)."""
    if not output_dir.strip():
        return "is empty (an unset shell variable?): name a folder for this run"
    p = Path(output_dir).expanduser().resolve()
    here = Path.cwd().resolve()
    special = {here: "the current folder", here.parent: "the parent of the current folder",
               Path(p.anchor): "the filesystem root", Path.home().resolve(): "the home folder"}
    if p in special:
        return (f"is {special[p]} ({p}): a run writes config.yaml, checkpoints/ and final/ into its folder; name "
                "a folder of its own")
    return None


RESUMABLE_CHANGES = ("output_dir", "checkpoint", "eval", "log", "demo", "optim.max_steps")


def resume_digest(cfg: TrainConfig) -> str:
    """sha256 of what a checkpoint's training depends on: everything but RESUMABLE_CHANGES (where to write,
    checkpointing, evaluation, logging, and max_steps: a run may be extended)."""
    d = to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        sec, _, name = key.partition(".")
        if name:
            d[sec].pop(name, None)
        else:
            d.pop(sec, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()



def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_dict(d: dict) -> TrainConfig:
    return build(TrainConfig, d, {})
