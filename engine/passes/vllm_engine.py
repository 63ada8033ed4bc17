"""vLLM as the engine of the teacher passes (`profuser teach|generate --engine vllm`).

    profuser generate --engine vllm --data-dir runs/wn --source /models/qwen2.5-7b-instruct --k 10
    profuser teach --engine vllm --tensor-parallel-size 2 --data-dir runs/wn --source /models/llama-3-70b-instruct

The vLLM path writes the same store as the transformers path (passes/teach.py, passes/generate.py build the
records; only the numbers come from here), so the loader never knows which engine ran. What maps where:

    our option / rule                      vLLM
    prompt tokens (chat template)          TokensPrompt(prompt_token_ids=...) built by text.chat.encode_example:
                                           the very ids of the transformers path (vLLM's own template is unused)
    top-k of log_softmax(raw logits)       logprobs=k (generate) / prompt_logprobs=k (teach), logprobs_mode
                                           "raw_logprobs": before temperature, top-p, penalties
    the source's logit transform           applied by vLLM's implementation of the architecture (softcap,
                                           logit scale); a source whose implementation does not read the
                                           transform's config key is refused (UnsupportedByVLLMError)
    stop tokens                            stop_token_ids = [end-of-turn, EOS]; generation_config="vllm" so the
                                           model folder's generation_config.json adds no other stop or default
    greedy / sampling                      temperature 0 / temperature, top_p, top_k (0 = off); min_p 0, no penalty
    seed (reproducible per shard)          one seed per request, derived from (seed, shard, row): the same
                                           answer whatever the batching; samples differ from the transformers
                                           engine's (another random stream), greedy answers do not
    max_new_tokens / max_length            max_tokens / prompts cut by encode_example; max_model_len =
                                           max_length + 1 for teach, the model's own for generate (or
                                           --max-model-len)
    dtype auto                             bfloat16 on GPU, float32 on CPU (as the transformers path)

Layout of what vLLM returns (flat_logprobs=True), per position: entry 0 is the chosen (or given) token with its
rank, entries 1..k the top-k by rank. prompt_logprobs[i] is the distribution of prompt token i given tokens < i,
so predicted position p of an EncodedExample reads entry p + 1.

Scale-out: tensor parallelism inside one engine (`tensor_parallel_size`); data parallelism by our
rank-owns-shards rule, one engine per rank (torchrun or --rank/--world-size): rank r with local rank l sees the
GPUs [l * tp, (l + 1) * tp) of its node, and the launcher's variables are hidden from vLLM's own process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from dataclasses import dataclass, field

import numpy as np

from .. import models

# the launcher variables vLLM must not take for its own (a one-rank engine inside a rank of ours)
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                 "PMI_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
# LogitTransform field -> the config keys a vLLM implementation must read to apply it
_TRANSFORM_KEYS = {"softcap": ("final_logit_softcapping",),
                   "scale": ("logit_scale", "logits_scaling", "output_multiplier")}
_VLLM_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class EngineUnavailableError(ImportError):
    """--engine vllm in an environment without vLLM."""


class UnsupportedByVLLMError(ValueError):
    """A source model or an option that the vLLM engine cannot run as the transformers engine does."""


@dataclass
class VLLMOptions:
    """How the engine is built. extra: any other vllm.LLM keyword (gpu_memory_utilization, max_num_seqs,
    kv_cache_dtype, ...) as given by --vllm-arg key=value."""

    tensor_parallel_size: int = 1  # vLLM: GPUs per engine
    max_model_len: int | None = None  # vLLM: context length of the engine (default: the pass's need)
    enforce_eager: bool | None = None  # None: True on CPU (no compile step for a short pass), vLLM's default on GPU
    extra: dict = field(default_factory=dict)  # any other vllm.LLM keyword

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


def parse_vllm_args(items: list[str] | None) -> dict:
    """["gpu_memory_utilization=0.85", "max_num_seqs=64"] -> {key: value parsed as YAML scalar}."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vllm-arg {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def import_vllm():
    """vllm, after checking that the installed transformers and torch are ones vLLM declares it works with
    (pip warns once at install time and then lets a later upgrade break the engine silently)."""
    try:
        import vllm
    except ImportError as exc:
        raise EngineUnavailableError(
            f"--engine vllm: vLLM is not importable in this environment ({exc}); on this CPU `make vllm-env` "
            "builds .venv-vllm (then run .venv-vllm/bin/profuser), on GPUs `pip install profuser[vllm]`") from exc
    conflicts = pin_conflicts()
    if conflicts:
        raise EngineUnavailableError(f"--engine vllm: {'; '.join(conflicts)} (reinstall vLLM's pins, or use a "
                                     "separate environment: make vllm-env)")
    return vllm


def pin_conflicts(packages=("transformers", "torch", "tokenizers")) -> list[str]:
    """Installed versions of `packages` outside what the installed vLLM distribution requires."""
    from importlib import metadata

    from packaging.requirements import Requirement

    dists = metadata.packages_distributions().get("vllm") or []
    out = []
    for dist in dists:
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.name not in packages or (req.marker is not None and not req.marker.evaluate()):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            if not req.specifier.contains(have, prereleases=True):
                out.append(f"{dist} {metadata.version(dist)} requires {req.name}{req.specifier}, found {have}")
    return out


def check_source(spec: str) -> None:
    """UnsupportedByVLLMError unless vLLM implements the source's architecture and its logit transform."""
    from transformers import AutoConfig

    vllm = import_vllm()
    path = models.resolve_model(spec)
    config = AutoConfig.from_pretrained(str(path))
    archs = list(getattr(config, "architectures", None) or [])
    supported = set(vllm.ModelRegistry.get_supported_archs())
    known = [a for a in archs if a in supported]
    if not known:
        raise UnsupportedByVLLMError(f"source {spec!r}: architecture {archs or 'unknown'} is not implemented by "
                                     f"vLLM {vllm.__version__}; use --engine hf for this source")
    transform = models.LogitTransform.of(config)
    needed = [k for k in (("softcap",) if transform.softcap else ()) + (("scale",) if transform.scale != 1 else ())]
    if needed:
        source = inspect.getsource(inspect.getmodule(vllm.ModelRegistry._try_load_model_cls(known[0])))
        missing = [k for k in needed if not any(key in source for key in _TRANSFORM_KEYS[k])]
        if missing:
            raise UnsupportedByVLLMError(
                f"source {spec!r}: vLLM's {known[0]} does not apply the model's logit {', '.join(missing)} "
                f"({transform}); its log-probs would differ from the transformers forward: use --engine hf")


@contextlib.contextmanager
def _engine_environment(device_type: str, local_rank: int, tp: int):
    """The process environment vLLM is built in: this rank's GPUs only, no launcher variables; on CPU a bounded
    KV cache (VLLM_CPU_KVCACHE_SPACE GiB, 2 unless set) and, with one engine rank, its threads on every core
    this process may use (VLLM_CPU_OMP_THREADS_BIND unless set: vLLM's "auto" keeps a core for its scheduler,
    which cost 27% of the generation rate on 2 cores, 46.8 vs 63.8 tok/s measured). Restored afterwards."""
    saved = dict(os.environ)
    try:
        for key in _LAUNCHER_ENV:
            os.environ.pop(key, None)
        if device_type == "cuda":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range((local_rank + 1) * tp)]
            mine = ids[local_rank * tp:(local_rank + 1) * tp]
            if len(mine) < tp:
                raise ValueError(f"local rank {local_rank} with tensor_parallel_size {tp} needs GPUs "
                                 f"{local_rank * tp}..{(local_rank + 1) * tp - 1}; this node shows {len(ids)}")
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        if device_type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            if tp == 1 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class VLLMSource:
    """A source served by vLLM: what the passes need in place of a transformers model."""

    llm: object
    vocab_size: int
    k: int

    def close(self) -> None:
        """Stop the engine's processes and free its memory before the next source loads."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def load(spec: str, dtype, device_type: str, local_rank: int, k: int, opts: VLLMOptions,
         max_model_len: int | None) -> VLLMSource:
    """A vLLM engine for one source on this rank's device(s). dtype: torch.dtype of models.resolve_dtype."""
    from transformers import AutoConfig

    vllm = import_vllm()
    check_source(spec)
    path = str(models.resolve_model(spec))
    name = str(dtype).removeprefix("torch.")
    if name not in _VLLM_DTYPES:
        raise UnsupportedByVLLMError(f"dtype {name} is not one vLLM runs")
    kwargs = dict(model=path, tokenizer=path, dtype=_VLLM_DTYPES[name], max_logprobs=k,
                  logprobs_mode="raw_logprobs", generation_config="vllm", seed=0,
                  tensor_parallel_size=opts.tensor_parallel_size, skip_tokenizer_init=False,
                  max_model_len=opts.max_model_len or max_model_len,
                  enforce_eager=opts.enforce_eager if opts.enforce_eager is not None else device_type == "cpu")
    kwargs.update(opts.extra)
    with _engine_environment(device_type, local_rank, opts.tensor_parallel_size):
        llm = vllm.LLM(**kwargs)
    text = AutoConfig.from_pretrained(path)
    vocab = int((getattr(text, "text_config", None) or text).vocab_size)
    return VLLMSource(llm=llm, vocab_size=vocab, k=k)


def _topk_rows(flat, first: int, n: int, k: int):
    """Positions first .. first + n - 1 of a FlatLogprobs -> (ids [n, k] int32, lps [n, k] f32, chosen lp [n],
    chosen ids [n])."""
    ids = np.zeros((n, k), np.int32)
    lps = np.zeros((n, k), np.float32)
    tok_lp = np.zeros(n, np.float32)
    tok_id = np.zeros(n, np.int64)
    for r in range(n):
        s, e = flat.start_indices[first + r], flat.end_indices[first + r]
        if e - s < k + 1:
            raise RuntimeError(f"vLLM returned {e - s - 1} log-probs at a position, expected {k}")
        tok_id[r], tok_lp[r] = flat.token_ids[s], flat.logprobs[s]
        ids[r] = flat.token_ids[s + 1:s + 1 + k]
        lps[r] = flat.logprobs[s + 1:s + 1 + k]
    return ids, lps, tok_lp, tok_id


def teach_predicted(src: VLLMSource, encs: list):
    """Teacher-forced top-k at the predicted positions of EncodedExamples, as forward.forward_predicted:
    topk_ids int32 [N, k], topk_lp float32 [N, k], token_lp float32 [N] over N = sum R in example order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if not encs:
        return np.zeros((0, src.k), np.int32), np.zeros((0, src.k), np.float32), np.zeros(0, np.float32)
    prompts = [TokensPrompt(prompt_token_ids=e.input_ids[:int(e.pred_pos[-1]) + 2].tolist()) for e in encs]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=src.k, detokenize=False,
                            flat_logprobs=True)
    outs = src.llm.generate(prompts, params, use_tqdm=False)
    parts = []
    for e, out in zip(encs, outs):
        flat = out.prompt_logprobs
        first = int(e.pred_pos[0]) + 1
        if not np.array_equal(np.diff(e.pred_pos), np.ones(e.n_predicted - 1, e.pred_pos.dtype)):
            raise ValueError("predicted positions must be contiguous")  # encode_example guarantees it
        ids, lps, tok_lp, tok_id = _topk_rows(flat, first, e.n_predicted, src.k)
        if not np.array_equal(tok_id, e.pred_ids):
            raise RuntimeError("vLLM scored other tokens than the ones given (prompt ids changed)")
        parts.append((ids, lps, tok_lp))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]))


def request_seed(seed: int, shard: int, row: int) -> int:
    """A 63-bit seed per (seed, shard, row): reproducible whatever the batching or the number of ranks."""
    digest = hashlib.blake2b(f"{seed}:{shard}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generate_rows(src: VLLMSource, prefixes: list, stop_ids: list[int], cfg, shard: int):
    """Generated ids with their top-k per row, as generate.generate_shard's transformers loop gives them:
    [(ids [T] int64 incl. the stop token when one ended the turn, topk ids [T, k], topk lp [T, k], lp [T])]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = []
    for i in range(len(prefixes)):
        params.append(SamplingParams(
            max_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.do_sample else 0.0,
            top_p=cfg.top_p if cfg.do_sample else 1.0, top_k=cfg.top_k_sampling if cfg.do_sample else 0,
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0,
            seed=request_seed(cfg.seed, shard, i) if cfg.do_sample else None, stop_token_ids=list(stop_ids),
            logprobs=src.k, detokenize=False, flat_logprobs=True, skip_special_tokens=False))
    outs = src.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prefixes], params,
                            use_tqdm=False)
    rows = []
    for out in outs:
        o = out.outputs[0]
        ids = np.asarray(o.token_ids, np.int64)
        kid, klp, tlp, chosen = _topk_rows(o.logprobs, 0, ids.shape[0], src.k)
        if not np.array_equal(chosen, ids):
            raise RuntimeError("vLLM's log-probs do not follow its generated tokens")
        rows.append((ids, kid, klp, tlp))
    return rows
