"""The options of every teacher pass (teach, generate; score and the benchmarks reuse them).

    PassConfig              sources, store names, k, batching, device, dtype, nan policy, engine, writer settings
    add_common_arguments    the command-line flags of PassConfig
    config_from_args        flags -> PassConfig keyword arguments
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import dist as _dist
from .. import models
from ..config import DTYPES, NAN_POLICIES, TEACHER_ENGINES
from ..store import WriteOptions
from . import vllm_engine


@dataclass
class PassConfig:
    """Options shared by teach and generate (generate.GenerateConfig adds the decoding settings).

    sources: model specs (alias or local folder); names: store folder per source (default: the alias or
    the folder name). batch_tokens: padded tokens per forward (B * L_max). logit_chunk_bytes: cap on one
    fp32 logits block. nan_policy: "error" raises naming the row; "drop" stores the row with nll_sum = NaN
    (every reader then skips it) and warns with a count, keeping shard j row-aligned with prepared shard j.
    engine: "hf" (transformers forward / generate) or "vllm" (vllm_engine.py; options in `vllm`); both write
    the same store. batch_tokens, max_batch_size and logit_chunk_bytes size the transformers engine only
    (vLLM schedules its own batches).
    """

    data_dir: str
    sources: list = field(default_factory=list)
    names: list | None = None
    k: int = 8
    batch_tokens: int = 8192
    max_batch_size: int = 64
    max_length: int | None = 2048
    device: str = "auto"
    dtype: str = "auto"
    logit_chunk_bytes: int = 256 << 20
    nan_policy: str = "error"
    overwrite: bool = False
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True
    threads: int | None = None
    wait: bool = False  # another writer holds a shard's lock: wait for it instead of failing
    write: WriteOptions = field(default_factory=WriteOptions)
    engine: str = "hf"
    vllm: vllm_engine.VLLMOptions = field(default_factory=vllm_engine.VLLMOptions)

    def __post_init__(self):
        if self.engine not in TEACHER_ENGINES:
            raise ValueError(f"engine must be one of {TEACHER_ENGINES}, got {self.engine!r}")
        if self.engine != "vllm" and (self.vllm.tensor_parallel_size > 1 or self.vllm.extra):
            raise ValueError("--tensor-parallel-size and --vllm-arg need --engine vllm")
        if self.engine == "vllm" and self.threads:
            raise vllm_engine.UnsupportedByVLLMError(
                "--threads with --engine vllm: vLLM's CPU backend binds its own threads (set "
                "VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1)")
        if not self.sources:
            raise ValueError("no --source given")
        if self.names is not None and len(self.names) != len(self.sources):
            raise ValueError(f"--name has {len(self.names)} entries for {len(self.sources)} sources")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.batch_tokens < 1 or self.max_batch_size < 1:
            raise ValueError("batch_tokens and max_batch_size must be >= 1")
        names = self.source_names
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names} (use --name)")

    @property
    def source_names(self) -> list[str]:
        return list(self.names) if self.names else [models.model_name(s) for s in self.sources]


def add_common_arguments(p) -> None:
    p.add_argument("--data-dir", required=True, help="the store folder (holds prepared/ from `profuser prepare`)")
    p.add_argument("--source", dest="sources", nargs="+", required=True,
                   help=f"model specs: aliases ({', '.join(models.ALIASES)}) or local HF folders")
    p.add_argument("--name", dest="names", nargs="+", default=None, help="store name per source")
    p.add_argument("--k", type=int, default=8, help="top-k entries stored per teacher and token")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward (B * L_max)")
    p.add_argument("--max-batch-size", type=int, default=64, help="examples per forward at most")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default="error",
                   help="NaN log-probs from a model: error naming the row, or drop (store the row marked)")
    p.add_argument("--overwrite", action="store_true", help="replace a store built for another model / set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compression-level", type=int, default=WriteOptions.compression_level,
                   help="zstd level of the stored shards")
    p.add_argument("--wait", action="store_true", help="wait for another writer of the same shards instead of failing")
    p.add_argument("--engine", choices=TEACHER_ENGINES, default="hf",
                   help="hf: transformers (default); vllm: vLLM (same store; needs vllm, see `make vllm-env`)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per engine")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM: context length of the engine")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM: any other vllm.LLM keyword, e.g. gpu_memory_utilization=0.85 (repeatable)")
    _dist.add_arguments(p)


def config_from_args(args) -> dict:
    return dict(data_dir=args.data_dir, sources=list(args.sources), names=args.names, k=args.k,
                batch_tokens=args.batch_tokens, max_batch_size=args.max_batch_size, device=args.device,
                dtype=args.dtype, nan_policy=args.nan_policy, overwrite=args.overwrite, rank=args.rank,
                world_size=args.world_size, progress=not args.no_progress, threads=args.threads, wait=args.wait,
                write=WriteOptions(compression_level=args.compression_level), engine=args.engine,
                vllm=vllm_engine.VLLMOptions(tensor_parallel_size=args.tensor_parallel_size,
                                             max_model_len=args.max_model_len,
                                             extra=vllm_engine.parse_vllm_args(args.vllm_arg)))
