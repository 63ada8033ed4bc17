"""One optimizer step of fusion training: the module DeepSpeed wraps and the window it runs.

    FusionStep(lm)    student backbone -> labelled rows [N, H] -> fusion_loss per mode, weighted
    merge_modes       micro-batches of both modes concatenated along B (one forward for both)
    build_engine      deepspeed.initialize around FusionStep, lm_head registered for ZeRO-3
    run_window        grad_accum micro-steps: global token counts, forward, backward, DeepSpeed step

Normalization (see engine/train.py's docstring for the loop around it): each mode's loss is a mean over
that mode's GLOBAL target-token count in the window, so the window's gradient is exactly that of
sum_m w_m L_m whatever the split of tokens over ranks and micro-batches; the loss is multiplied by the
world size because DeepSpeed averages gradients over ranks.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

from profuser.engine.config import ConfigError, TrainConfig
from profuser.engine.schedule import lr_factor

MODES = ("infer", "train")  # mode names; the loader's `mode` column: 1 = infer, 0 = train
MODE_ID = {"infer": 1, "train": 0}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the example ids and the saved checkpoint."""


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


class FusionStep(nn.Module):
    """The module DeepSpeed wraps: student backbone -> labelled rows -> fused loss per mode.

    forward(batch, weights, counts, scale) -> (loss [], parts dict of 0-dim tensors)
        batch: the loader's dict, modes concatenated along B (see merge_modes); tensors on device
        weights: {"infer": w1, "train": w2}; counts: {"infer": N_infer, "train": N_train} (global counts)
        scale: multiplier of the returned loss (world size, see the module docstring)
    """

    def __init__(self, lm: nn.Module, cfg: TrainConfig, vocab_maps: list):
        super().__init__()
        self.lm = lm
        self.cfg = cfg.loss
        self.vocab_maps = vocab_maps
        softcap = cfg.loss.softcap
        self.softcap = softcap if softcap is not None else getattr(lm.config, "final_logit_softcapping", None)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.lm, self.lm.base_model_prefix)

    def forward(self, batch: dict, weights: dict, counts: dict, scale: float):
        from profuser.kernels import fusion_loss

        head = self.lm.get_output_embeddings()
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        B, L, H = hidden.shape
        labels = batch["labels"].reshape(B * L)
        rows = (labels != -100).nonzero().squeeze(1)  # [N] labelled positions
        h = hidden.reshape(B * L, H).index_select(0, rows)  # [N, H]
        y = labels.index_select(0, rows)
        row_mode = batch["mode"][:, None].expand(B, L).reshape(B * L).index_select(0, rows)
        T, K = batch["teacher_ids"].shape[0], batch["teacher_ids"].shape[-1]
        t_ids = batch["teacher_ids"].reshape(T, B * L, K).index_select(1, rows)  # [T, N, K]
        t_lp = batch["teacher_logprobs"].reshape(T, B * L, K).index_select(1, rows)  # -inf at empty slots
        t_w = batch["teacher_weights"].reshape(T, B * L).index_select(1, rows)  # [T, N]
        # keeps every parameter in the graph on every rank, even with no labelled rows: ZeRO's gradient
        # reduction is collective, a rank whose loss skipped a parameter would hang the others
        total = 0.0 * (hidden.sum() + head.weight.sum())
        parts = {}
        for mode in MODES:
            sel = (row_mode == MODE_ID[mode]).nonzero().squeeze(1)
            if weights.get(mode, 0.0) <= 0 or sel.numel() == 0:
                continue
            loss_m, stats = fusion_loss(
                h.index_select(0, sel), head.weight, y.index_select(0, sel),
                t_ids.index_select(1, sel), t_lp.index_select(1, sel), t_w.index_select(1, sel),
                vocab_maps=self.vocab_maps, bias=getattr(head, "bias", None), lam=self.cfg.lam,
                temperature=self.cfg.temperature, softcap=self.softcap, missing_mass=self.cfg.missing_mass,
                reduction="mean", num_items=max(counts[mode], 1.0), backend=self.cfg.backend, return_stats=True)
            total = total + (weights[mode] * scale) * loss_m
            parts[mode] = (loss_m.detach(), sel.numel(), stats)
        return total, parts


def merge_modes(batches: list[dict], pad_id: int) -> dict:
    """Concatenate micro-batches of different modes along B, right-padding to the longest L.

    Tensors: input_ids/attention_mask/labels [B, L]; teacher_ids/logprobs [T, B, L, K]; weights [T, B, L].
    """
    if len(batches) == 1:
        return batches[0]
    L = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "teacher_ids": -1,
            "teacher_logprobs": 0.0, "teacher_weights": 0.0}
    out: dict = {}
    for key, value in fill.items():
        dim = 1 if key in ("input_ids", "attention_mask", "labels") else 2
        padded = []
        for b in batches:
            t = b[key]
            if t.shape[dim] < L:
                shape = list(t.shape)
                shape[dim] = L - t.shape[dim]
                t = torch.cat([t, t.new_full(shape, value)], dim=dim)
            padded.append(t)
        out[key] = torch.cat(padded, dim=0 if dim == 1 else 1)
    out["mode"] = torch.cat([b["mode"] for b in batches])
    out["example_ids"] = [i for b in batches for i in b["example_ids"]]
    out["n_tokens"] = sum(int(b["n_tokens"]) for b in batches)
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    wrapper = FusionStep(lm, cfg, vocab_maps)
    if optimizer is None:
        decay = [p for p in wrapper.parameters() if len(full_shape(p)) >= 2]
        no_decay = [p for p in wrapper.parameters() if len(full_shape(p)) < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.optim, s))
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if stage == 3:
        # the fused loss reads lm_head.weight outside lm_head.forward: make ZeRO-3 gather it for the
        # wrapper's forward (a tied embedding is the same Parameter, registered once, gathered once)
        head = engine.module.lm.get_output_embeddings()
        deepspeed.zero.register_external_parameter(engine.module, head.weight)
        if getattr(head, "bias", None) is not None:
            deepspeed.zero.register_external_parameter(engine.module, head.bias)
    return engine, scheduler, stage


def run_window(engine, window: list[list[dict]], step_modes: list[str], weights: dict, *, pad_id: int,
               device: torch.device, on_nonfinite=None) -> tuple[torch.Tensor, dict]:
    """One optimizer step: forward/backward every micro-batch of the window, then DeepSpeed steps.

    window: grad_accum lists, each holding one loader batch per mode in step_modes.
    Returns (acc, counts): acc float64 [8] summed over ranks = (loss, L_infer, L_train, ce*n infer,
    kd*n infer, ce*n train, kd*n train, tokens); counts {mode: global target tokens of the window}.
    """
    world = dist.get_world_size()
    local = torch.tensor([sum(int(mb[i]["n_tokens"]) for mb in window) for i in range(len(step_modes))]
                         + [0.0] * (2 - len(step_modes)), dtype=torch.float64, device=device)  # on device: NCCL
    dist.all_reduce(local)  # the window's global token count per mode (loss normalization)
    counts = {m: float(local[i]) for i, m in enumerate(step_modes)}
    acc = torch.zeros(8, dtype=torch.float64, device=device)
    for micro in window:
        batch = to_device(merge_modes(micro, pad_id), device)
        loss, parts = engine(batch, weights, counts, float(world))
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item():
            if on_nonfinite is not None:
                on_nonfinite(batch, float(loss.detach()))
            raise NonFiniteLossError(f"non-finite loss; example ids of the batch: {batch['example_ids']}")
        engine.backward(loss, scale_wrt_gas=False)  # already normalized by the window's global count
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        acc[0] += float(loss.detach()) / world
        for j, mode in enumerate(MODES):
            if mode in parts:
                s, n, stats = parts[mode]
                acc[1 + j] += float(s)
                acc[3 + 2 * j] += float(stats.ce) * n
                acc[4 + 2 * j] += float(stats.kd) * n
        acc[7] += int(batch["n_tokens"])
    dist.all_reduce(acc)
    return acc.cpu(), counts
