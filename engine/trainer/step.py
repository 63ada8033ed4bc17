"""One optimizer step of fusion training: the module DeepSpeed wraps and the window it runs.

    FusionStep(lm)    student backbone -> labelled rows [N, H] -> fusion_loss per mode, weighted
    merge_modes       micro-batches of both modes concatenated along B (one forward for both)
    run_window        grad_accum micro-steps: global token counts, forward, backward, DeepSpeed step

Normalization: each mode's loss is a mean over that mode's GLOBAL target-token count in the window, so the
window's gradient is exactly that of sum_m w_m L_m whatever the split of tokens over ranks and
micro-batches; the loss is multiplied by the world size because DeepSpeed averages gradients over ranks.

Logits: the student's own output transform (models.LogitTransform: logit scaling, soft-capping) is what
the loss sees: the labelled hidden rows are multiplied by its scale ((s h) W^T = s W h) and its cap is the
fused loss's softcap, so the student is trained on the logits its forward and the evaluation compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import MODE_ID, MODES, LossConfig
from ..models import LogitTransform


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the example ids and the saved checkpoint."""


class FusionStep(nn.Module):
    """The module DeepSpeed wraps: student backbone -> labelled rows -> fused loss per mode.

    forward(batch, weights, counts, scale) -> (loss [], parts {mode: (L_m [], rows n, FusionStats)})
        batch: the loader's dict, modes concatenated along B (see merge_modes); tensors on device
        weights: {"infer": w1, "train": w2}; counts: {"infer": N_infer, "train": N_train} (global counts)
        scale: multiplier of the returned loss (world size, see the module docstring)
    """

    def __init__(self, lm: nn.Module, loss: LossConfig, vocab_maps: list):
        super().__init__()
        self.lm = lm
        self.cfg = loss
        self.vocab_maps = vocab_maps
        transform = LogitTransform.of(lm.config)
        self.logit_scale = transform.scale
        self.softcap = loss.softcap if loss.softcap is not None else transform.softcap

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
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
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


@dataclass
class ModeTotals:
    """One mode's results over an optimizer step's window, summed over all ranks."""

    loss: float = 0.0  # L_m, the mode's loss (a mean over its global target tokens)
    ce: float = 0.0  # mean CE per target token
    kd: float = 0.0  # mean KD per target token
    tokens: int = 0  # global target tokens of the mode in the window


@dataclass
class WindowResult:
    """What one optimizer step did, over all ranks: loss = sum_m w_m L_m."""

    loss: float = 0.0
    tokens: int = 0
    modes: dict[str, ModeTotals] = field(default_factory=dict)


def _all_reduce_sums(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum named scalars over ranks in one collective (on `device`: NCCL only reduces CUDA tensors)."""
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def run_window(engine, window: list[list[dict]], step_modes: list[str], weights: dict, *, pad_id: int,
               device: torch.device, on_nonfinite=None) -> WindowResult:
    """One optimizer step: forward/backward every micro-batch of the window, then DeepSpeed steps.

    window: grad_accum lists, each holding one loader batch per mode in step_modes.
    """
    world = dist.get_world_size()
    counts = _all_reduce_sums({m: sum(int(mb[i]["n_tokens"]) for mb in window) for i, m in enumerate(step_modes)},
                              device)  # the window's global token count per mode (loss normalization)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = {"loss": zero, "tokens": zero, **{f"{m}.{k}": zero for m in step_modes for k in ("loss", "ce", "kd")}}
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
        sums["loss"] = sums["loss"] + loss.detach().double() / world
        sums["tokens"] = sums["tokens"] + int(batch["n_tokens"])
        for mode, (loss_m, n, stats) in parts.items():
            sums[f"{mode}.loss"] = sums[f"{mode}.loss"] + loss_m.double()
            sums[f"{mode}.ce"] = sums[f"{mode}.ce"] + stats.ce.double() * n
            sums[f"{mode}.kd"] = sums[f"{mode}.kd"] + stats.kd.double() * n
    got = _all_reduce_sums(sums, device)
    modes = {m: ModeTotals(loss=got[f"{m}.loss"], ce=got[f"{m}.ce"] / max(counts[m], 1.0),
                           kd=got[f"{m}.kd"] / max(counts[m], 1.0), tokens=int(counts[m])) for m in step_modes}
    return WindowResult(loss=got["loss"], tokens=int(got["tokens"]), modes=modes)
