"""`profuser teach` (training mode): every source's top-k distributions on the gold responses.

    profuser teach --data-dir runs/wn --source smollm2-135m-instruct gemma3-270m --k 8
    torchrun --nproc_per_node 8 -m profuser.engine.cli teach --data-dir ... --source ...   # shards by rank

For each source and each prepared example (prompt, gold response), the conversation is encoded with the
source's own chat template (text.chat.encode_example) and run teacher-forced (forward.forward_predicted:
top-k of the model's own log-softmax at every predicted position). Per row it stores

    topk ids (int32) and log-probs (fp16, descending), the predicted token's log-prob,
    nll_sum = -sum_r lp_r[token_r],   n_bytes = text.chat.predicted_bytes (+1 for end-of-turn)

MinCE compares nll_sum / n_bytes across sources (tokenizers of different granularity: per token is not
comparable); nll_sum / n_tokens is kept for the per-token variant. The forward and its memory / batching
rules are in passes/forward.py, the shard driver and resumption in passes/driver.py. With `--engine vllm` the
top-k come from
vLLM's prompt_logprobs (vllm_engine.teach_predicted) and everything else is this module's.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..config_cli import add_config_arguments, config_from_args
from ..models import pad_id
from ..store import TeacherShard, prompt_fingerprint
from ..text.chat import encode_example, predicted_bytes
from . import vllm_engine
from .driver import Progress, run_pass
from .forward import check_nan, forward_predicted, length_batches
from .options import PASS_FLAGS, PassConfig


def _forward_batched(model, tok, encs: list, cfg: PassConfig, device, off: np.ndarray, prog: Progress):
    """The transformers engine: length-bucketed batches through forward.forward_predicted, rows put back in
    example order. Returns topk_ids int32 [N, k], topk_lp float32 [N, k], token_lp float32 [N]."""
    pad = pad_id(tok)
    topk_ids = np.zeros((off[-1], cfg.k), np.int32)
    topk_lp = np.zeros((off[-1], cfg.k), np.float32)
    tok_lp = np.zeros(off[-1], np.float32)
    R = np.diff(off)
    for batch in length_batches([len(e.input_ids) for e in encs], cfg.batch_tokens, cfg.max_batch_size):
        ti, tl, tk = forward_predicted(model, [encs[i] for i in batch], cfg.k, device, pad, cfg.logit_chunk_bytes)
        s = 0
        for i in batch:
            topk_ids[off[i]:off[i + 1]] = ti[s:s + R[i]]
            topk_lp[off[i]:off[i + 1]] = tl[s:s + R[i]]
            tok_lp[off[i]:off[i + 1]] = tk[s:s + R[i]]
            s += R[i]
        prog.update(len(batch), int(R[batch].sum()))
    return topk_ids, topk_lp, tok_lp


def teach_shard(model, tok, cfg: PassConfig, device, table: pa.Table, where: str, prog: Progress):
    """Records of one prepared shard (rows in shard order)."""
    eids, prompts = table["example_id"].to_pylist(), table["prompt"].to_pylist()
    responses, systems = table["response"].to_pylist(), table["system"].to_pylist()
    histories = table["history"].to_pylist()
    encs = []
    for i, (p, r, s, h) in enumerate(zip(prompts, responses, systems, histories)):
        try:
            encs.append(encode_example(tok, p, r, system=s, history=h, max_length=cfg.max_length))
        except ValueError as exc:
            raise ValueError(f"{where}: row {i} (example_id {eids[i]!r}): {exc}") from exc
    n = len(encs)
    R = np.array([e.n_predicted for e in encs], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(R)])
    if isinstance(model, vllm_engine.VLLMSource):  # vLLM schedules the whole shard itself
        topk_ids, topk_lp, tok_lp = vllm_engine.teach_predicted(model, encs)
        prog.update(n, int(off[-1]))
    else:
        topk_ids, topk_lp, tok_lp = _forward_batched(model, tok, encs, cfg, device, off, prog)
    pred_offsets = np.concatenate([e.pred_offsets for e in encs]) if n else np.zeros((0, 2), np.int32)
    records = TeacherShard(
        example_ids=eids, responses=responses, tok_off=off, offsets=pred_offsets,
        prompt_shas=[prompt_fingerprint(p, s, h) for p, s, h in zip(prompts, systems, histories)],
        token_ids=np.concatenate([e.pred_ids for e in encs]).astype(np.int32), token_logprobs=tok_lp,
        topk_ids=topk_ids, topk_logprobs=topk_lp,
        n_bytes=np.array([predicted_bytes(r, e.pred_offsets) for r, e in zip(responses, encs)], np.int32))
    return records, {"n_nan_rows": check_nan(records, cfg.nan_policy, where),
                     "n_input_tokens": int(sum(len(e.input_ids) for e in encs))}


def teach(cfg: PassConfig, *, after_shard=None) -> dict:
    """Training-mode pass of every source; returns {source name: stats}."""
    return run_pass(cfg, "train", lambda model, tok, device, j, t, w, p: teach_shard(model, tok, cfg, device, t, w, p),
                    after_shard=after_shard, max_model_len=cfg.max_length + 1 if cfg.max_length else None)


def add_arguments(p) -> None:
    add_config_arguments(p, PassConfig, flags=PASS_FLAGS)


def run_command(args) -> int:
    teach(config_from_args(PassConfig, args))
    return 0
