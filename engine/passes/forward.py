"""The teacher forward: teacher-forced top-k log-probabilities at the predicted positions, and the source
model it runs.

    forward_predicted         teacher-forced top-k log-probs at the predicted positions of encoded examples
    topk_logprobs             top-k of log_softmax over the full vocabulary, in row chunks
    length_batches            examples grouped by length under a padded-token budget
    check_nan                 NaN log-probs: an error naming the row, or the row marked
    load_source               a source model and tokenizer on this rank's device (transformers or vLLM)

At each predicted position p (a response token or the end-of-turn), with hidden state h_p [H] and the
lm_head W [V, H]:

    z = models.output_logits(W h_p)  (the model's own transform: soft-capping, logit scaling),
    lp = log_softmax(z) [V];  store topk(lp, K) (ids int32, log-probs fp16, descending) and lp[token]

Memory: the base model returns hidden states [B, L, H]; only the R predicted rows are gathered ([N, H]),
and the lm_head runs on chunks of those rows sized so one fp32 [rows, V] logits block stays under
`logit_chunk_bytes`. So no [B, L, V] tensor exists, and only [N, K] results leave the device.

Batches: examples of a shard are sorted by length and cut into batches of at most `batch_tokens` padded
tokens (B * L_max) and `max_batch_size` rows (length bucketing keeps padding small). Right padding.
bf16 on GPU, fp32 on CPU (dtype "auto", models.resolve_dtype).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .. import dist as _dist
from .. import models
from ..store import TeacherShard
from . import vllm_engine
from .options import PassConfig


@torch.no_grad()
def topk_logprobs(model, h: torch.Tensor, targets: torch.Tensor | None, k: int, chunk_bytes: int = 256 << 20):
    """Top-k of log_softmax over the full vocabulary for each hidden row, in row chunks.

    Args:
        h: [N, H] hidden states of the predicting positions; targets: [N] int64 or None.
    Returns:
        topk_ids [N, k] int64, topk_lp [N, k] float32 (descending), token_lp [N] float32 (or None).
    """
    V = model.get_output_embeddings().weight.shape[0]
    rows = max(1, chunk_bytes // (4 * V))
    ids, lps, tlp = [], [], []
    for s in range(0, h.shape[0], rows):
        lp = torch.log_softmax(models.output_logits(model, h[s:s + rows]), dim=-1)
        v, i = lp.topk(min(k, V), dim=-1)
        ids.append(i)
        lps.append(v)
        if targets is not None:
            tlp.append(lp.gather(1, targets[s:s + rows, None]).squeeze(1))
    if not ids:
        z = h.new_zeros((0, k))
        return z.long(), z.float(), (z[:, 0].float() if targets is not None else None)
    return torch.cat(ids), torch.cat(lps), (torch.cat(tlp) if targets is not None else None)


@torch.no_grad()
def forward_predicted(model, encs: list, k: int, device: torch.device, pad_id: int,
                      chunk_bytes: int = 256 << 20):
    """Teacher-forced top-k at the predicted positions of a batch of EncodedExamples.

    Returns numpy arrays over the N = sum R predicted tokens in example order:
    topk_ids int32 [N, k], topk_lp float32 [N, k], token_lp float32 [N].
    """
    B, L = len(encs), max(len(e.input_ids) for e in encs)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    mask = np.zeros((B, L), dtype=np.int64)
    for b, e in enumerate(encs):
        ids[b, : len(e.input_ids)] = e.input_ids
        mask[b, : len(e.input_ids)] = 1
    rows_b = np.concatenate([np.full(e.n_predicted, b) for b, e in enumerate(encs)]).astype(np.int64)
    rows_p = np.concatenate([e.pred_pos for e in encs]).astype(np.int64)
    tgt = np.concatenate([e.pred_ids for e in encs]).astype(np.int64)
    hidden = model.base_model(input_ids=torch.from_numpy(ids).to(device),
                              attention_mask=torch.from_numpy(mask).to(device)).last_hidden_state
    h = hidden[torch.from_numpy(rows_b).to(device), torch.from_numpy(rows_p).to(device)]
    ti, tl, tok = topk_logprobs(model, h, torch.from_numpy(tgt).to(device), k, chunk_bytes)
    return ti.int().cpu().numpy(), tl.float().cpu().numpy(), tok.float().cpu().numpy()


def length_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length: B * L_max <= batch_tokens (a longer single example
    gets its own batch), B <= max_batch_size. Sorted by length, longest first (OOM shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur = [], []
    for i in order:
        lmax = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * lmax > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def check_nan(batch: TeacherShard, policy: str, where: str) -> int:
    """NaN log-probs: raise naming the row, or mark the rows (nll_sum becomes NaN). Returns the count."""
    R = batch.n_tokens
    row_of = np.repeat(np.arange(len(batch.example_ids)), R)
    bad_tok = np.isnan(batch.token_logprobs) | np.isnan(batch.topk_logprobs).any(1)
    if not bad_tok.any():
        return 0
    rows = np.unique(row_of[bad_tok])
    if policy == "error":
        raise FloatingPointError(f"{where}: row {rows[0]} (example_id {batch.example_ids[rows[0]]!r}): NaN "
                                 f"log-probabilities from the model ({rows.size} rows; "
                                 f"--nan-policy drop marks them)")
    batch.token_logprobs[np.isin(row_of, rows)] = np.nan
    batch.nll_sum[rows] = np.nan  # readers flag the row (TeacherShard.bad_rows) and apply their nan_policy
    return int(rows.size)


def load_source(spec: str, cfg: PassConfig, local_rank: int, max_model_len: int | None = None):
    """(model, tokenizer, device, tokenizer hash, vocab size) of one source; with engine "vllm" the model is a
    vllm_engine.VLLMSource (max_model_len: its context unless cfg.vllm sets one)."""
    from ..text.align import tokenizer_hash

    if cfg.threads:
        # on a CPU shared with other jobs, 2+ intra-op threads can be ~8x slower than 1 (measured: a
        # SmolLM2 forward took 13.9 s with 2 threads and 1.6 s with 1 at load average 7 on 2 cores)
        torch.set_num_threads(cfg.threads)
    if cfg.engine == "vllm":
        # no torch.cuda call before vLLM starts: its processes must inherit this rank's CUDA_VISIBLE_DEVICES
        kind = "cpu" if cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_visible()) else "cuda"
        device = torch.device(kind)
        model = vllm_engine.load(spec, models.resolve_dtype(cfg.dtype, device), kind, local_rank, cfg.k, cfg.vllm,
                                 max_model_len)
        tok = models.load_tokenizer(spec)
        return model, tok, device, tokenizer_hash(tok), model.vocab_size
    device = _dist.device_for(local_rank, cfg.device)
    # the model first: for an alias it converts the GGUF once, tokenizer included
    model = models.load_model(spec, dtype=models.resolve_dtype(cfg.dtype, device)).to(device)
    tok = models.load_tokenizer(spec)
    vocab = model.get_output_embeddings().weight.shape[0]
    return model, tok, device, tokenizer_hash(tok), vocab


def _cuda_visible() -> bool:
    """Whether this machine has a CUDA device, without initializing CUDA in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return torch.version.cuda is not None and Path("/proc/driver/nvidia").exists()
