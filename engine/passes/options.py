"""The options of every teacher pass (teach, generate; score and the benchmarks reuse them).

    PassConfig        sources, store names, k, batching, device, dtype, nan policy, engine, writer settings
    PASS_FLAGS        the established flag names of its fields (config_cli generates every other flag)

`profuser teach --help` lists them all; a YAML file of the same keys works with `--config`, and key=value
overrides after the flags (engine/config_cli.py: one mechanism for every command).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import models
from ..config import NAN_POLICIES, TEACHER_ENGINES, DataConfig
from ..config_cli import Flag
from ..store import WriteOptions
from . import vllm_engine

PASS_FLAGS = {
    "sources": Flag("--source", nargs="+"), "names": Flag("--name", nargs="+"),
    "progress": Flag(negate="--no-progress"), "write.compression_level": Flag("--compression-level"),
    "vllm.tensor_parallel_size": Flag("--tensor-parallel-size"), "vllm.max_model_len": Flag("--max-model-len"),
    "vllm.extra": Flag("--vllm-arg", parse=vllm_engine.parse_vllm_args,
                       help="vLLM: any other vllm.LLM keyword, e.g. gpu_memory_utilization=0.85"),
}


@dataclass
class PassConfig:
    """Options shared by teach and generate (generate.GenerateConfig adds the decoding settings).

    nan_policy "drop" stores a NaN row with nll_sum = NaN (every reader then skips it) and warns with a
    count, keeping shard j row-aligned with prepared shard j. engine "hf" (transformers forward / generate)
    or "vllm" (vllm_engine.py; options in `vllm`) write the same store; batch_tokens, max_batch_size and
    logit_chunk_bytes size the transformers engine only (vLLM schedules its own batches).
    """

    data_dir: str  # the store folder (holds prepared/ from `profuser prepare`)
    # model specs: aliases (smollm2-135m-instruct, gemma3-270m) or local Hugging Face folders
    sources: list[str] = field(default_factory=list)
    names: list[str] | None = None  # store name per source (default: the alias or the folder name)
    k: int = DataConfig.k  # top-k entries stored per teacher and token (training's data.k default)
    batch_tokens: int = 8192  # padded tokens per forward (B * L_max)
    max_batch_size: int = 64  # examples per forward at most
    # cap on prompt + response tokens per example: the response is truncated to fit; an example whose
    # templated prompt alone exceeds it is an error naming the row
    max_length: int | None = 2048
    device: str = "auto"  # auto (this rank's GPU, else cpu) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    logit_chunk_bytes: int = 256 << 20  # cap on one fp32 [rows, V] logits block
    nan_policy: str = "error"  # NaN log-probs from a model: error naming the row, or drop (the row marked)
    overwrite: bool = False  # replace a store built for another model or prepared set
    rank: int | None = None  # this process's rank (default: from the launcher's environment)
    world_size: int | None = None  # number of processes (default: from the launcher's environment)
    progress: bool = True  # a progress bar
    threads: int | None = None  # torch CPU threads (default: torch's choice, the core count)
    wait: bool = False  # another writer holds a shard's lock: wait for it instead of failing
    write: WriteOptions = field(default_factory=WriteOptions)  # the Parquet writer
    engine: str = "hf"  # hf: transformers | vllm: vLLM (the same store; needs `make vllm-env`)
    vllm: vllm_engine.VLLMOptions = field(default_factory=vllm_engine.VLLMOptions)  # the vLLM engine

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
