"""`profuser generate` (inference mode): each source answers every prompt, with its top-k log-probs.

    profuser generate --data-dir runs/wn --source smollm2-135m-instruct gemma3-270m --max-new-tokens 64
    profuser generate ... --do-sample --temperature 0.7 --top-p 0.9 --seed 1

Each source generates with its own chat template (the prefix of chat.encode_example, so exactly the
tokens a teacher-forced pass would see) from left-padded batches. During generation a logits processor
records, at every step t, top-k of log_softmax(z_t) of the model's RAW logits z_t, and the log-prob of
the token then chosen. It runs before any warper (temperature, top-k, top-p are appended after user
processors by transformers), and the generation config sets every other processor to its neutral value,
so what is stored is the model's unwarped distribution: identical to a teacher-forced forward on the
generated sequence (tests/engine/passes/test_score.py checks it), which this capture saves.

Records use the training-mode format (store.TeacherShard) with the generated text as `response`: the
tokens before the first stop token (the end-of-turn of the template, or EOS). The stop token is the last
predicted token, with span [len, len]. A response that hit max_new_tokens has no stop token: it is stored
without one, and counted per shard in the manifest (TeacherManifest.counters["n_truncated"]). Token spans
come from cumulative decoding of the generated ids (not from re-tokenizing the text, which could give
other ids).

Sampling is reproducible per shard: the generator is seeded with (seed, shard), so a resumed or
re-sharded run samples the same responses.

Engines: the transformers loop above (`_hf_rows`), or vLLM (`--engine vllm`, vllm_engine.generate_rows),
which returns the same per-row arrays; everything after them (stop handling, offsets, records) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ..config_cli import add_config_arguments, config_from_args
from ..models import pad_id
from ..store import TeacherShard, prompt_fingerprint
from ..text.chat import encode_example, predicted_bytes
from . import vllm_engine
from .driver import Progress, run_pass
from .forward import check_nan
from .options import PASS_FLAGS, PassConfig


@dataclass
class GenerateConfig(PassConfig):
    """PassConfig plus the decoding settings (greedy unless do_sample)."""

    max_new_tokens: int = 256  # cap on each generated response (tokens)
    do_sample: bool = False  # sample instead of greedy decoding
    temperature: float = 1.0  # sampling temperature (with do_sample)
    top_p: float = 1.0  # nucleus sampling mass (with do_sample)
    top_k_sampling: int = 0  # top-k filter when sampling (0 = off)
    seed: int = 0  # sampling seed (per request: seed, shard, row)
    gen_batch_size: int = 16  # prompts generated together

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")

    def settings(self) -> dict:
        """What the manifest records (a resumed run must use the same)."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature if self.do_sample else None,
                "top_p": self.top_p if self.do_sample else None,
                "top_k": self.top_k_sampling if self.do_sample else None,
                "seed": self.seed if self.do_sample else None}


class TopKCapture:
    """LogitsProcessor recording top-k of log_softmax(raw scores) per step; returns scores unchanged.

    After generate(): ids [B, T, k] int64, lps [B, T, k] float32, token_lp [B, T] float32 (log-prob of
    the token chosen at each step), all on the scores' device until collected.
    """

    def __init__(self, k: int):
        self.k, self.ids, self.lps, self.tok, self.prev = k, [], [], [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(scores.float(), dim=-1)
        if self.prev is not None:  # the token chosen at the previous step is now the last input id
            self.tok.append(self.prev.gather(1, input_ids[:, -1:])[:, 0])
        v, i = lp.topk(self.k, dim=-1)
        self.ids.append(i)
        self.lps.append(v)
        self.prev = lp
        return scores

    def collect(self, sequences: torch.Tensor):
        self.tok.append(self.prev.gather(1, sequences[:, -1:])[:, 0])
        self.prev = None
        return (torch.stack(self.ids, 1).cpu().numpy(), torch.stack(self.lps, 1).cpu().numpy(),
                torch.stack(self.tok, 1).cpu().numpy())


def decode_offsets(tok, ids: list[int]) -> tuple[str, np.ndarray]:
    """(text, spans int32 [n, 2]) of generated ids by cumulative decoding.

    Span i = [len(decode(ids[:i])), len(decode(ids[:i+1]))), clipped to stay monotonic; pieces that end in
    an incomplete character ("\\ufffd") take the span of the character they complete.
    """
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = tok.decode(ids, **kw)
    out = np.zeros((len(ids), 2), np.int32)
    prev, pending = 0, []
    for i in range(len(ids)):
        s = tok.decode(ids[: i + 1], **kw)
        if s.endswith("\ufffd") and not text[: len(s)].endswith("\ufffd"):
            pending.append(i)
            continue
        cur = min(max(len(s), prev), len(text))
        for j in pending + [i]:
            out[j] = (prev, cur)
        pending.clear()
        prev = cur
    for j in pending:
        out[j] = (prev, len(text))
    return text, out


def _gen_config(cfg: GenerateConfig, stop_ids: list[int], pad: int):
    from transformers import GenerationConfig

    # explicit neutral values: the model's own generation_config only fills fields left at None
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
        temperature=cfg.temperature if cfg.do_sample else 1.0, top_p=cfg.top_p if cfg.do_sample else 1.0,
        top_k=cfg.top_k_sampling if cfg.do_sample else None, min_p=None, typical_p=1.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=stop_ids, pad_token_id=pad,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, num_beams=1,
        output_logits=False, return_dict_in_generate=True)


@torch.no_grad()
def _hf_rows(model, device, prefixes: list, gcfg, pad: int, k: int, batch_size: int, prog: Progress) -> list:
    """The transformers engine: left-padded batches (longest first) through model.generate with TopKCapture.
    Returns per row (generated ids [T] int64, topk ids [T, k], topk lp [T, k], chosen lp [T]); T is the
    batch's length: a row that stopped earlier carries padding after its stop token."""
    from transformers import LogitsProcessorList

    n = len(prefixes)
    rows: list = [None] * n
    order = sorted(range(n), key=lambda i: -len(prefixes[i]))
    for s in range(0, n, batch_size):
        batch = order[s:s + batch_size]
        P = max(len(prefixes[i]) for i in batch)
        ids = np.full((len(batch), P), pad, np.int64)
        mask = np.zeros((len(batch), P), np.int64)
        for b, i in enumerate(batch):  # left padding: every prompt ends at column P - 1
            ids[b, P - len(prefixes[i]):] = prefixes[i]
            mask[b, P - len(prefixes[i]):] = 1
        cap = TopKCapture(k)
        out = model.generate(input_ids=torch.from_numpy(ids).to(device),
                             attention_mask=torch.from_numpy(mask).to(device), generation_config=gcfg,
                             logits_processor=LogitsProcessorList([cap]))
        kid, klp, tlp = cap.collect(out.sequences)
        gen_ids = out.sequences[:, P:].cpu().numpy()
        for b, i in enumerate(batch):
            rows[i] = (gen_ids[b], kid[b], klp[b], tlp[b])
        prog.update(len(batch), 0)
    return rows


def generate_shard(model, tok, cfg: GenerateConfig, device, table: pa.Table, where: str, prog: Progress,
                   shard: int):
    """Generated records of one prepared shard (rows in shard order) and counters."""
    eids, prompts = table["example_id"].to_pylist(), table["prompt"].to_pylist()
    systems, histories = table["system"].to_pylist(), table["history"].to_pylist()
    prefixes, stop = [], None
    for i, (p, s, h) in enumerate(zip(prompts, systems, histories)):
        try:
            enc = encode_example(tok, p, "", system=s, history=h)  # empty response: pred 0 is the end-of-turn
        except ValueError as exc:
            raise ValueError(f"{where}: row {i} (example_id {eids[i]!r}): {exc}") from exc
        prefixes.append(enc.input_ids[: int(enc.pred_pos[0]) + 1])
        stop = int(enc.pred_ids[0])
    eos = tok.eos_token_id
    stop_ids = [stop] + ([int(eos)] if eos is not None and eos != stop else [])  # either ends the turn
    pad = pad_id(tok)
    n = len(prefixes)
    if isinstance(model, vllm_engine.VLLMSource):
        raw = vllm_engine.generate_rows(model, prefixes, stop_ids, cfg, shard) if n else []
        prog.update(n, 0)
    else:
        if cfg.do_sample:
            torch.manual_seed(cfg.seed * 1_000_003 + shard)
        raw = _hf_rows(model, device, prefixes, _gen_config(cfg, stop_ids, pad), pad, cfg.k, cfg.gen_batch_size, prog)
    results, truncated, n_tok = [], 0, 0
    for row, kid, klp, tlp in raw:  # keep the tokens up to the first stop token, that one included
        hits = np.nonzero(np.isin(row, stop_ids))[0]
        ends = hits.size > 0
        n_resp = int(hits[0]) if ends else row.shape[0]
        truncated += int(not ends)
        text, spans = decode_offsets(tok, row[:n_resp].tolist())
        R = n_resp + int(ends)
        if ends:
            spans = np.concatenate([spans, [[len(text), len(text)]]]).astype(np.int32)
        results.append((text, spans, row[:R].astype(np.int32), tlp[:R], kid[:R], klp[:R]))
        n_tok += R
    prog.update(0, n_tok)
    R = np.array([r[1].shape[0] for r in results], np.int64)
    records = TeacherShard(
        example_ids=eids, responses=[r[0] for r in results], tok_off=np.concatenate([[0], np.cumsum(R)]),
        prompt_shas=[prompt_fingerprint(p, s, h) for p, s, h in zip(prompts, systems, histories)],
        offsets=np.concatenate([r[1] for r in results]).reshape(-1, 2),
        token_ids=np.concatenate([r[2] for r in results]), token_logprobs=np.concatenate([r[3] for r in results]),
        topk_ids=np.concatenate([r[4] for r in results]).reshape(-1, cfg.k),
        topk_logprobs=np.concatenate([r[5] for r in results]).reshape(-1, cfg.k),
        n_bytes=np.array([predicted_bytes(r[0], r[1]) for r in results], np.int32))
    counters = {"n_rows": n, "n_truncated": truncated, "n_nan_rows": check_nan(records, cfg.nan_policy, where)}
    return records, counters


def generate(cfg: GenerateConfig, *, after_shard=None) -> dict:
    """Inference-mode pass of every source; returns {source name: stats}."""
    return run_pass(cfg, "infer", lambda model, tok, device, j, t, w, p: generate_shard(model, tok, cfg, device, t, w,
                                                                                         p, j),
                    generation=cfg.settings(), after_shard=after_shard)


def add_arguments(p) -> None:
    add_config_arguments(p, GenerateConfig, flags=PASS_FLAGS)


def run_command(args) -> int:
    generate(config_from_args(GenerateConfig, args))
    return 0
