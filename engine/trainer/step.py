"""One optimizer step of fusion training: the module DeepSpeed wraps and the window it runs.

    FusionStep(lm)    student backbone -> labelled rows [N, H] -> ONE fusion_loss call for every mode
    merge_modes       micro-batches of both modes concatenated along B (one forward for both)
    run_window        grad_accum micro-steps: global token counts, forward, backward, DeepSpeed step

Normalization: each mode's loss is a mean over that mode's GLOBAL target-token count in the window, so the
window's gradient is exactly that of sum_m w_m L_m whatever the split of tokens over ranks and
micro-batches; the loss is multiplied by the world size because DeepSpeed averages gradients over ranks.
All of it is one per-row scale, row_weights_i = w_m * world / N_m for the rows of mode m, so both modes
share one fusion_loss call (one pass over the lm_head weight, one weight-gradient buffer).

No host synchronisation inside a micro-step: labelled rows are gathered with nonzero_static (the loader
counted them on the host: n_tokens), a right-padded batch reaches the backbone without an attention mask
(causal attention never reads the padding after a row's tokens, and transformers' all-ones check of a mask
would read the device), token counts and per-row scales stay on the device, the loss is called
with validate=False (the loader validated every stored row), and per-mode statistics are sums of the
per-row terms on the device. The window reads the device once, at the accumulation boundary, before the
optimizer step: the non-finite check (a NaN must never reach the weights) and the statistics travel in the
same all-reduce.

Logits: the student's own output transform (models.LogitTransform: logit scaling, soft-capping) is what
the loss sees: the labelled hidden rows are multiplied by its scale ((s h) W^T = s W h) and its cap is the
fused loss's softcap, so the student is trained on the logits its forward and the evaluation compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..config import MODE_ID, LossConfig
from ..loader.packing import forward_kwargs as packed_forward_kwargs
from ..loader.packing import varlen_bounds
from ..models import LogitTransform

# columns of the per-mode statistics FusionStep returns: [len(MODE_ID), 7]; sums over the mode's rows of the
# row's loss, CE and KD, of the teachers' stored top-k probability mass (weighted by the row's teacher weights)
# and of the part of it that maps into the student's vocabulary (kept_mass = kept / stored: what alignment
# keeps of the teachers' targets), of the student's probability mass on the teachers' support and of the rows
# with kept teacher mass, the rows that have a KD term (student_mass = mass / kd_rows: how much of what the
# student predicts the KD term sees at all)
STAT_COLUMNS = ("loss", "ce", "kd", "kept", "stored", "mass", "kd_rows")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the example ids and the saved checkpoint."""


class FusionStep(nn.Module):
    """The module DeepSpeed wraps: student backbone -> labelled rows -> one fused loss call for all modes.

    forward(batch, mode_scale) -> (loss [], stats [len(MODE_ID), len(STAT_COLUMNS)])
        batch: the loader's dict, modes concatenated along B (see merge_modes); tensors on device;
            batch["n_tokens"] (host int) = its labelled positions
        mode_scale: [len(MODE_ID)] float tensor on the device, indexed by MODE_ID: the per-row loss weight
            of each mode (w_m * world / N_m, see the module docstring)
        stats: per mode (rows MODE_ID), the sums over its rows of loss_i, CE_i, KD_i (unweighted) and of the
            kept and stored teacher mass, the student's mass on the teachers' support and the KD rows
            (STAT_COLUMNS)
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

    def forward(self, batch: dict, mode_scale: torch.Tensor):
        from profuser.kernels import fusion_loss

        head = self.lm.get_output_embeddings()
        if batch.get("packed"):  # attention kept inside each example (loader/packing.py)
            kw = packed_forward_kwargs(batch, self.lm.config._attn_implementation)
        else:
            kw = {"attention_mask": None if batch.get("right_padded") else batch["attention_mask"]}
        hidden = self.backbone(input_ids=batch["input_ids"], use_cache=False, **kw)[0]
        B, L, H = hidden.shape
        labels = batch["labels"].reshape(B * L)
        # [N] labelled positions; N is known on the host, so no device read (nonzero would sync)
        rows = torch.nonzero_static(labels != -100, size=int(batch["n_tokens"])).squeeze(1)
        h = hidden.reshape(B * L, H).index_select(0, rows)  # [N, H]
        if self.logit_scale != 1.0:
            h = h * self.logit_scale
        y = labels.index_select(0, rows)
        row_mode = batch["mode"][:, None].expand(B, L).reshape(B * L).index_select(0, rows)  # [N] MODE_ID
        T, K = batch["teacher_ids"].shape[0], batch["teacher_ids"].shape[-1]
        t_ids = batch["teacher_ids"].reshape(T, B * L, K).index_select(1, rows)  # [T, N, K]
        t_lp = batch["teacher_logprobs"].reshape(T, B * L, K).index_select(1, rows)  # -inf at empty slots
        t_w = batch["teacher_weights"].reshape(T, B * L).index_select(1, rows)  # [T, N]
        # keeps every parameter in the graph on every rank, even with no labelled rows: ZeRO's gradient
        # reduction is collective, a rank whose loss skipped a parameter would hang the others
        keep = 0.0 * (hidden.sum() + head.weight.sum())
        loss, st = fusion_loss(
            h, head.weight, y, t_ids, t_lp, t_w, vocab_maps=self.vocab_maps, bias=getattr(head, "bias", None),
            lam=self.cfg.lam, temperature=self.cfg.temperature, softcap=self.softcap,
            missing_mass=self.cfg.missing_mass, reduction="sum", row_weights=mode_scale.index_select(0, row_mode),
            backend=self.cfg.backend, return_stats=True, validate=False)
        lam = self.cfg.lam
        kept, stored = self.teacher_mass(t_ids, t_lp, t_w)
        per_row = torch.stack([lam * st.row_ce + (1.0 - lam) * st.row_kd, st.row_ce, st.row_kd, kept, stored,
                               st.row_mass, (kept > 0).to(kept.dtype)], 1)
        stats = torch.zeros((len(MODE_ID), len(STAT_COLUMNS)), dtype=torch.float64, device=per_row.device)
        stats.index_add_(0, row_mode, per_row.double())
        return keep + loss, stats


    @torch.no_grad()
    def teacher_mass(self, t_ids: torch.Tensor, t_lp: torch.Tensor, t_w: torch.Tensor):
        """[N] kept and stored teacher probability mass per row: sum over teachers t of w_t * sum_k p_tk over
        the non-empty top-k entries (stored), and over those whose id maps into the student's vocabulary (kept)."""
        p = t_lp.float().exp() * t_w.float().unsqueeze(-1)  # [T, N, K]; an empty slot has log-prob -inf
        nonempty = t_ids >= 0
        kept = torch.stack([ne & (vm.to(ids.device)[ids.clamp_min(0).long()] >= 0) if vm is not None else ne
                            for vm, ids, ne in zip(self.vocab_maps, t_ids, nonempty)])
        return (p * kept).sum((0, 2)), (p * nonempty).sum((0, 2))


def merge_modes(batches: list[dict], pad_id: int) -> dict:
    """Concatenate micro-batches of different modes along B, right-padding to the longest L (host tensors).

    Tensors: input_ids/attention_mask/labels [B, L] (and position_ids of packed batches); teacher_ids/logprobs
    [T, B, L, K]; weights [T, B, L]. Sets right_padded (bool): every row's mask is ones then zeros (FusionStep
    then needs no mask). Packed batches (loader/packing.py) stay packed: the padding appended to a row gets
    position 0 at every slot (each pad token a sequence of its own), example_row is shifted by the rows before,
    the varlen bounds are those of the merged rows.
    """
    if len(batches) == 1:
        return dict(batches[0], right_padded=_right_padded(batches[0]["attention_mask"]))
    L = max(b["input_ids"].shape[1] for b in batches)
    packed = [bool(b.get("packed")) for b in batches]
    if any(packed) and not all(packed):
        raise ValueError("merge_modes: packed and padded micro-batches in one step (data.packing is one setting)")
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "teacher_ids": -1,
            "teacher_logprobs": 0.0, "teacher_weights": 0.0, **({"position_ids": 0} if all(packed) else {})}
    out: dict = {}
    for key, value in fill.items():
        dim = 1 if key in ("input_ids", "attention_mask", "labels", "position_ids") else 2
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
    if all(packed):
        starts = torch.tensor([0] + [b["input_ids"].shape[0] for b in batches]).cumsum(0)
        out["example_row"] = torch.cat([b["example_row"] + s for b, s in zip(batches, starts.tolist())])
        out["cu_seq_lens"], out["max_seq_len"] = varlen_bounds(out["position_ids"])
        out["packed"] = True
    out["n_tokens"] = sum(int(b["n_tokens"]) for b in batches)
    out["right_padded"] = _right_padded(out["attention_mask"])
    return out


def _right_padded(mask: torch.Tensor) -> bool:
    """[B, L] host mask: ones then only zeros in every row."""
    return torch.equal(mask.cumprod(1), mask)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; on CUDA through pinned host memory with non-blocking copies (the copy overlaps
    the previous micro-step's kernels instead of waiting for them)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin and not v.is_pinned() else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class ModeTotals:
    """One mode's results over an optimizer step's window, summed over all ranks."""

    loss: float = 0.0  # L_m, the mode's loss (a mean over its global target tokens)
    ce: float = 0.0  # mean CE per target token
    kd: float = 0.0  # mean KD per target token
    tokens: int = 0  # global target tokens of the mode in the window
    kept_mass: float = float("nan")  # of the teachers' stored top-k mass, the share alignment kept
    student_mass: float = float("nan")  # the student's mean probability mass on the teachers' support (KD rows)


@dataclass
class WindowResult:
    """What one optimizer step did, over all ranks: loss = sum_m w_m L_m."""

    loss: float = 0.0
    tokens: int = 0
    modes: dict[str, ModeTotals] = field(default_factory=dict)


def run_window(engine, window: list[list[dict]], step_modes: list[str], weights: dict, *, pad_id: int,
               device: torch.device, on_nonfinite=None) -> WindowResult:
    """One optimizer step: forward/backward every micro-batch of the window, then DeepSpeed steps.

    window: grad_accum lists, each holding one loader batch per mode in step_modes. The device is read once,
    at the accumulation boundary (module docstring).
    """
    world = dist.get_world_size()
    n_modes = len(MODE_ID)
    # the window's global token count per mode (the loss normalization), reduced on the device
    counts = torch.zeros(n_modes, dtype=torch.float64)
    for i, m in enumerate(step_modes):
        counts[MODE_ID[m]] = float(sum(int(mb[i]["n_tokens"]) for mb in window))
    counts = counts.to(device)
    dist.all_reduce(counts)
    w = torch.zeros(n_modes, dtype=torch.float64)
    for m in step_modes:
        w[MODE_ID[m]] = float(weights[m]) * world
    mode_scale = (w.to(device) / counts.clamp_min(1.0)).to(torch.float32)
    stats = torch.zeros((n_modes, len(STAT_COLUMNS)), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bad = torch.zeros(len(window), dtype=torch.float64, device=device)  # per micro-step: 1 if non-finite
    batches = []
    for j, micro in enumerate(window):
        batch = to_device(merge_modes(micro, pad_id), device)
        batches.append(batch)
        loss, st = engine(batch, mode_scale)
        bad[j] = (~torch.isfinite(loss.detach())).double()
        engine.backward(loss, scale_wrt_gas=False)  # already normalized by the window's global count
        if j == len(window) - 1:
            # the one device read of the window, before the optimizer step at the boundary: the non-finite
            # flags of every micro-step and every rank, and the statistics, in one all-reduce
            stats = stats + st
            loss_sum = loss_sum + loss.detach().double() / world
            packed = torch.cat([bad, loss_sum.reshape(1), counts / world, stats.reshape(-1)])  # counts: global
            dist.all_reduce(packed)
            got = packed.tolist()
            flags = got[: len(window)]
            if any(f > 0 for f in flags):
                k = next(i for i, f in enumerate(flags) if f > 0)
                if on_nonfinite is not None:
                    on_nonfinite(batches[k], float("nan"))
                raise NonFiniteLossError(f"non-finite loss; example ids of the batch: {batches[k]['example_ids']}")
        else:
            stats = stats + st
            loss_sum = loss_sum + loss.detach().double() / world
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
    rest = got[len(window):]
    total_loss, counts_h = rest[0], rest[1: 1 + n_modes]
    sums = rest[1 + n_modes:]
    modes = {}
    for m in step_modes:
        i, n = MODE_ID[m], max(counts_h[MODE_ID[m]], 1.0)
        col = sums[i * len(STAT_COLUMNS): (i + 1) * len(STAT_COLUMNS)]
        loss_m, ce_m, kd_m, kept_m, stored_m, mass_m, kd_rows_m = col
        modes[m] = ModeTotals(loss=loss_m / n, ce=ce_m / n, kd=kd_m / n, tokens=int(round(counts_h[i])),
                              kept_mass=kept_m / stored_m if stored_m > 0 else float("nan"),
                              student_mass=mass_m / kd_rows_m if kd_rows_m > 0 else float("nan"))
    tokens = int(round(sum(counts_h[MODE_ID[m]] for m in step_modes)))
    return WindowResult(loss=total_loss, tokens=tokens, modes=modes)
