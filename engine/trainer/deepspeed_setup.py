"""DeepSpeed around the student: the DeepSpeed JSON from TrainConfig, the student loaded (partitioned under
ZeRO-3), and deepspeed.initialize around FusionStep.

ZeRO-3 and the lm_head: the fused loss reads `lm_head.weight` outside `lm_head.forward`, so the weight is
registered as an external parameter of the wrapper module (deepspeed.zero.register_external_parameter):
ZeRO-3 gathers it for the wrapper's forward and releases it afterwards. The loss library computes the
weight's gradient inside forward (reduction mean/sum), so the weight is never needed in backward. A tied
embedding is the same tensor: it is registered once and DeepSpeed never gathers it twice.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging

import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..models import load_model, resolve_model
from .schedule import effective_lam, lr_factor
from .step import FusionStep

log = logging.getLogger("profuser.train")


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON from the config's `deepspeed` section plus the keys the typed sections own."""
    ds = copy.deepcopy(cfg.deepspeed)
    owned = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"deepspeed.{key}={ds[key]!r} conflicts with the engine's value {value!r}; "
                              "set it through the typed section (data.micro_batch_size, optim.grad_accum, "
                              "optim.grad_clip) instead")
        ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed: micro * accum * world
    ds.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    ds.setdefault("fp16", {})["enabled"] = dtype == torch.float16
    ds.setdefault("zero_optimization", {}).setdefault("stage", 3)
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW as client optimizer (no 36 s JIT build)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def resolve_attention(name: str) -> str:
    """"auto": flash_attention_2 on a GPU where flash-attn is installed, else sdpa."""
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_student(cfg: TrainConfig, dtype: torch.dtype, ds_config: dict):
    """The student model in training mode. Under ZeRO-3 the weights are partitioned while they load
    (deepspeed.zero.Init through transformers' HfDeepSpeedConfig), so no rank ever holds the whole model:
    what lets a large student start on nodes whose CPU memory could not hold one full copy per rank."""
    # an alias converts its GGUF into the model cache on first use: that conversion builds a whole model and
    # must run before the partitioned-init context below, or it saves the empty [0] partitions
    folder = resolve_model(cfg.model.student)
    zero3 = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config)  # must stay alive while the model loads
    lm = load_model(folder, dtype=dtype, attn_implementation=resolve_attention(cfg.model.attn_implementation))
    del zero3
    lm.config.use_cache = False
    if cfg.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.r:
        add_lora(lm, cfg.model.lora)
    lm.train()
    return lm


def add_lora(lm: nn.Module, lora) -> None:
    """Inject a LoRA adapter into `lm` in place (peft): only the adapter's parameters train, the base and the
    lm_head are frozen (the fused loss then skips the head's gradient). The PeftModel that exports the adapter
    is kept as lm.peft_model (outside the module tree, so DeepSpeed and state_dict never see it twice)."""
    from peft import LoraConfig, get_peft_model

    if lm.is_gradient_checkpointing:
        lm.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    peft_model = get_peft_model(lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    object.__setattr__(lm, "peft_model", peft_model)
    object.__setattr__(lm, "lora_export", lora.export)


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it (its local data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def build_engine(cfg: TrainConfig, lm: nn.Module, vocab_maps: list, dtype: torch.dtype, optimizer=None):
    """deepspeed.initialize around FusionStep(lm). Returns (engine, lr_scheduler, zero_stage).

    optimizer: a torch optimizer over the wrapper's parameters, or None for AdamW from cfg.optim (torch's
    AdamW as client optimizer: no 36 s JIT build of DeepSpeed's CPU/fused Adam).
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, dtype)
    stage = ds_config["zero_optimization"]["stage"]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if stage == 3 and world == 1:  # measured on the demo: peak 13.7 GB at stage 3, 7.1 GB at stage 0
        log.warning("deepspeed.zero_optimization.stage=3 in one process partitions nothing and holds the "
                    "model's state twice (about 2x host memory, slower steps); stage=0 trains the same "
                    "(docs/training.md)")
    wrapper = FusionStep(lm, dataclasses.replace(cfg.loss, lam=effective_lam(cfg)), vocab_maps)
    if optimizer is None:  # the trainable parameters only (a LoRA run freezes the base)
        trainable = [p for p in wrapper.parameters() if p.requires_grad]
        decay = [p for p in trainable if len(full_shape(p)) >= 2]
        no_decay = [p for p in trainable if len(full_shape(p)) < 2]
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # an empty group (a LoRA adapter has matrices only) would be dropped by DeepSpeed after the scheduler
        # counted it
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.optim, s))
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if stage == 3:
        head = engine.module.lm.get_output_embeddings()
        deepspeed.zero.register_external_parameter(engine.module, head.weight)
        if getattr(head, "bias", None) is not None:
            deepspeed.zero.register_external_parameter(engine.module, head.bias)
    return engine, scheduler, stage
