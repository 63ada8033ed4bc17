"""Progressive knowledge-fusion training of the target LLM with DeepSpeed (ZeRO stage 0-3).

Launch (any of):
    deepspeed engine/train.py --config configs/demo.yaml                    # 1 process per GPU
    deepspeed --num_gpus 2 engine/train.py --config configs/demo.yaml       # 2 CPU ranks (gloo) on a CPU box
    torchrun --nproc_per_node 8 engine/train.py --config configs/llama3-8b-multinode.yaml
    python engine/train.py --config configs/demo.yaml optim.lr=3e-5         # one process, no launcher
    profuser train --config configs/demo.yaml schedule.kind=simul

The loop, top to bottom (one optimizer step = `optim.grad_accum` micro-steps per rank):
    w1, w2 = schedule(step)                       inference-mode / training-mode weights; a mode with w = 0
                                                  is not loaded this step
    fetch grad_accum micro-batches of each active mode; all_reduce their target-token counts N_m
    for each micro-step:
        h = student.model(input_ids)              final hidden states [B, L, H]; the forward stops before lm_head
        rows = labelled positions                 [N, H]
        L_m = fusion_loss(h[rows of mode m], lm_head.weight, ..., reduction="mean", num_items=N_m)
        loss = sum_m w_m * L_m                    each mode normalized by its GLOBAL token count over the window
        engine.backward(loss * world_size)        DeepSpeed averages gradients over ranks; * W undoes that, so
                                                  the window's gradient is exactly that of sum_m w_m L_m
        engine.step()                             clip + AdamW + lr schedule at the window boundary

ZeRO-3 and the lm_head: the fused loss reads `lm_head.weight` outside `lm_head.forward`, so the weight is
registered as an external parameter of the wrapper module (deepspeed.zero.register_external_parameter):
ZeRO-3 gathers it for the wrapper's forward and releases it afterwards. The loss library computes the
weight's gradient inside forward (reduction mean/sum), so the weight is never needed in backward. A tied
embedding is the same tensor: it is registered once and DeepSpeed never gathers it twice.

Checkpoints (engine/checkpoint.py) every `checkpoint.every` steps, at the end and on SIGTERM; a run
resumes exactly from `<output_dir>/checkpoints/latest` (checkpoint.resume=auto). A non-finite loss stops
the run with the step and the batch's example ids after saving the state before that step.
"""

import os
import sys

# Run as a script, sys.path[0] is engine/, where files like engine/data.py would shadow top-level modules
# of the same name (a `datasets` import that finds our data.py...). Drop it before any other import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from profuser.engine import checkpoint as ckpt  # noqa: E402
from profuser.engine.config import ConfigError, TrainConfig, dump_yaml, load_config  # noqa: E402
from profuser.engine.evaluate import make_evaluator  # noqa: E402
from profuser.engine.metrics import MetricsLogger, peak_memory_mb  # noqa: E402
from profuser.engine.schedule import fusion_weights, lr_factor, stage_of  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed's deprecated collective names on every ZeRO step: one warning per
# step would drown the progress log
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated",
                        category=FutureWarning)

MODES = ("infer", "train")  # mode names; the loader's `mode` column: 1 = infer, 0 = train
MODE_ID = {"infer": 1, "train": 0}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the example ids and the saved checkpoint."""


# ----------------------------------------------------------------------------------------------------
# setup


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialize torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). Returns (rank, world, device).

    Without a launcher, set the single-process environment ourselves: otherwise DeepSpeed falls back to
    MPI discovery and fails with `No module named 'mpi4py'`.
    """
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port, so two single-process runs never collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attention(name: str) -> str:
    if name != "auto":
        return name
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_student(cfg: TrainConfig, dtype: torch.dtype, ds_config: dict | None = None):
    """The student and its tokenizer. Under ZeRO-3 the weights are partitioned while they load
    (deepspeed.zero.Init through transformers' HfDeepSpeedConfig), so no rank ever holds the whole model:
    what lets a large student start on nodes whose CPU memory could not hold one full copy per rank."""
    from profuser.engine.models import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model.student)
    zero3 = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config)  # must stay alive while the model loads
    lm = load_model(cfg.model.student, dtype=dtype, attn_implementation=resolve_attention(cfg.model.attn_implementation))
    del zero3
    lm.config.use_cache = False
    if cfg.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    return lm, tok


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


# ----------------------------------------------------------------------------------------------------
# data


def check_store(cfg: TrainConfig, modes: list[str]) -> None:
    """Fail early with a clear message when the prepared set / teacher store is missing or mismatched."""
    for mode in modes:
        key, root = data_dir_of(cfg, mode)
        prepared = root / "prepared" / "manifest.json"
        if not prepared.is_file():
            raise FileNotFoundError(f"{key}={root}: no prepared set ({prepared} is missing); "
                                    "run `profuser prepare` first")
        fingerprint = json.loads(prepared.read_text()).get("fingerprint")
        for source in cfg.data.sources:
            manifest = root / "teachers" / source / mode / "manifest.json"
            if not manifest.is_file():
                step = "teach" if mode == "train" else "generate"
                raise FileNotFoundError(f"data.sources: no {mode}-mode store for source {source!r} "
                                        f"({manifest} is missing); run `profuser {step}` first")
            m = json.loads(manifest.read_text())
            if m.get("prepared_fingerprint") != fingerprint:
                raise ValueError(f"{manifest}: built for another prepared set (prepared_fingerprint "
                                 f"{m.get('prepared_fingerprint')!r} != {fingerprint!r} in {prepared}); "
                                 "re-run teach/generate on this prepared set")


def data_dir_of(cfg: TrainConfig, mode: str) -> tuple[str, Path]:
    """(config key, folder) of the store of `mode`."""
    if mode == "infer" and cfg.data.infer_data_dir:
        return "data.infer_data_dir", Path(cfg.data.infer_data_dir)
    return "data.data_dir", Path(cfg.data.data_dir)


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also when ZeRO-3 has partitioned it (its local data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def check_vocab(loader, vocab_rows: int, student: str) -> None:
    """Every mapped teacher id must index a row of the student's lm_head."""
    for name, vm in zip(loader.source_names, loader.vocab_maps):
        if vm is not None and vm.numel() and int(vm.max()) >= vocab_rows:
            raise ValueError(f"model.student={student}: its lm_head has {vocab_rows} rows but the vocab map of "
                             f"source {name!r} maps to id {int(vm.max())}; the store was built for another "
                             "student tokenizer")


class InfiniteLoader:
    """Iterates a FusionLoader epoch after epoch; its state_dict is the loader's plus the epoch number."""

    def __init__(self, loader, mode: str, rank: int):
        self.loader, self.mode, self.rank, self.epoch = loader, mode, rank, 0
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is None:
                raise RuntimeError(f"rank {self.rank}: the {self.mode}-mode loader yields no batch (fewer store "
                                   "shards than ranks? shard j goes to rank j % world_size)") from None
            return batch

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd["loader"])
        self.epoch = sd["epoch"]
        self._it = None


def build_loaders(cfg: TrainConfig, tok, modes: list[str], rank: int, world: int) -> dict:
    from profuser.engine.data import FusionDataConfig, FusionLoader

    d = cfg.data
    loaders = {}
    for mode in modes:
        dcfg = FusionDataConfig(
            data_dir=str(data_dir_of(cfg, mode)[1]), sources=list(d.sources), student=cfg.model.student, mode=mode, k=d.k,
            max_length=d.max_length, batch_size=d.micro_batch_size, advantage=d.advantage,
            advantage_level=d.advantage_level, ce_metric=d.ce_metric, student_as_candidate=d.student_as_candidate,
            shuffle_buffer=d.shuffle_buffer, seed=cfg.seed, align_method=d.align_method, nan_policy=d.nan_policy)
        loaders[mode] = InfiniteLoader(FusionLoader(dcfg, tok, rank=rank, world_size=world), mode, rank)
    return loaders


def active_modes(cfg: TrainConfig) -> list[str]:
    """Modes with a non-zero weight at some step (the others' stores are never opened)."""
    used = set()
    for s in range(cfg.optim.max_steps):
        w1, w2 = fusion_weights(cfg.schedule, s, cfg.optim.max_steps)
        used |= {m for m, w in zip(MODES, (w1, w2)) if w > 0}
    return [m for m in MODES if m in used]


# ----------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Run training to cfg.optim.max_steps (resuming if possible). Returns a summary dict."""
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    config_yaml = dump_yaml(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
        print(f"[profuser train] resolved config (world size {world}, device {device}):\n{config_yaml}",
              file=sys.stderr, flush=True)

    # --- data first: a bad store fails in seconds, before any model is loaded
    modes = active_modes(cfg)
    check_store(cfg, modes)
    dtype = resolve_dtype(cfg.model.dtype)
    lm, tok = load_student(cfg, dtype, deepspeed_config(cfg, dtype))
    loaders = build_loaders(cfg, tok, modes, rank, world)
    any_loader = next(iter(loaders.values())).loader
    check_vocab(any_loader, full_shape(lm.get_output_embeddings().weight)[0], cfg.model.student)
    vocab_maps = [vm.to(device) if vm is not None else None for vm in any_loader.vocab_maps]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- DeepSpeed engine around the loss wrapper
    engine, scheduler, stage = build_engine(cfg, lm, vocab_maps, dtype)

    # --- resume
    start_step = 0
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        resume_from = ckpt.latest_checkpoint(ckpt_dir)
    elif cfg.checkpoint.resume != "never":
        resume_from = Path(cfg.checkpoint.resume)
    if resume_from is not None:
        state = ckpt.load(engine, resume_from, rank=rank)
        start_step = state["step"]
        for mode, sd in state["loaders"].items():
            if mode in loaders:
                loaders[mode].load_state_dict(sd)
        if rank == 0:
            print(f"[profuser train] resumed from {resume_from} at step {start_step}", file=sys.stderr, flush=True)

    log = MetricsLogger(out, rank=rank, total_steps=cfg.optim.max_steps, start_step=start_step,
                        tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
    evaluator = make_evaluator(cfg, tok, device)

    # SIGTERM (preemption, scancel): finish the current step, save, exit
    stop = {"flag": False}
    prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    def trainer_state(step: int, loader_states: dict | None = None) -> dict:
        return {"step": step, "loaders": loader_states or {m: ld.state_dict() for m, ld in loaders.items()},
                "world_size": world}

    def save(step: int) -> Path:
        return ckpt.save(engine, ckpt_dir, ckpt.tag_for(step), trainer_state(step), config_yaml, rank=rank,
                         keep_last=cfg.checkpoint.keep_last)

    last_saved = start_step if resume_from is not None else -1
    t_last, tok_since = time.time(), 0
    summary: dict = {"start_step": start_step}
    step = start_step
    exit_code = 0
    try:
        while step < cfg.optim.max_steps:
            w1, w2 = fusion_weights(cfg.schedule, step, cfg.optim.max_steps)
            weights = {"infer": w1, "train": w2}
            step_modes = [m for m in modes if weights[m] > 0]
            window_loaders = {m: ld.state_dict() for m, ld in loaders.items()}  # for a NaN checkpoint
            window_rng = ckpt.rng_state()

            # fetch the whole window, so the global token count of each mode is known before any backward
            window = [[loaders[m].next() for m in step_modes] for _ in range(cfg.optim.grad_accum)]

            def on_nonfinite(batch, loss):
                path = ckpt.save(engine, ckpt_dir, f"nan-{ckpt.tag_for(step)}",
                                 dict(trainer_state(step, window_loaders), rng=window_rng), config_yaml,
                                 rank=rank, update_latest=False)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (rank {rank}, loss {loss}); example ids of the batch: "
                    f"{batch['example_ids']}; state before this step saved in {path}")

            acc, counts = run_window(engine, window, step_modes, weights, pad_id=pad_id, device=device,
                                     on_nonfinite=on_nonfinite)
            step += 1

            # --- logging (rank 0), all values global over ranks and the window
            tok_since += int(acc[7])
            if step % cfg.log.every == 0 or step == cfg.optim.max_steps:
                now = time.time()
                row = {"kind": "train", "step": step, "loss": float(acc[0]), "w_infer": w1, "w_train": w2,
                       "stage": stage_of(cfg.schedule, step - 1, cfg.optim.max_steps),
                       "lr": cfg.optim.lr * lr_factor(cfg.optim, step - 1),
                       "tokens": int(acc[7]), "tokens_per_s": tok_since / max(now - t_last, 1e-9),
                       "peak_mem_mb": peak_memory_mb()}
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    row["grad_norm"] = float(gn)
                for j, mode in enumerate(MODES):
                    if mode in counts and counts[mode] > 0:
                        row[f"loss_{mode}"] = float(acc[1 + j])
                        row[f"ce_{mode}"] = float(acc[3 + 2 * j]) / counts[mode]
                        row[f"kd_{mode}"] = float(acc[4 + 2 * j]) / counts[mode]
                log.log(row)
                log.progress(cfg.log.every if step % cfg.log.every == 0 else step % cfg.log.every, {
                    "loss": f"{row['loss']:.4f}", **{k: f"{row[k]:.3f}" for k in row if k[:3] in ("ce_", "kd_")},
                    "tok/s": f"{row['tokens_per_s']:.0f}", "mem": f"{row['peak_mem_mb']:.0f}M"})
                t_last, tok_since = now, 0
                summary["last"] = row

            if evaluator is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.optim.max_steps:
                res = evaluator(engine.module.lm)
                log.log({"kind": "eval", "step": step, **res})
                engine.module.lm.train()

            # collectives run on `device`: NCCL (the GPU backend) only reduces CUDA tensors
            stop_flag = torch.tensor([1.0 if stop["flag"] else 0.0], device=device)
            dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX)
            if stop_flag.item():
                save(step)
                log.write(f"[profuser train] SIGTERM: saved checkpoint at step {step}, exiting")
                exit_code = 143
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.optim.max_steps:
                save(step)
                last_saved = step
    except BaseException:
        log.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, prev_handler)

    summary["exit_code"] = exit_code
    if exit_code:
        log.close()
        return summary
    final = save(step) if last_saved != step else ckpt_dir / ckpt.tag_for(step)
    summary["checkpoint"] = str(final)
    if evaluator is not None:  # final held-out eval of the engine's own (possibly partitioned) student
        res = evaluator(engine.module.lm)
        log.log({"kind": "eval", "step": step, **res})
        summary["eval"] = res
    if cfg.checkpoint.export:
        export_dir = ckpt.export_student(engine.module.lm, tok, final, out / "final", stage=stage, rank=rank)
        summary["export"] = str(export_dir)
        if rank == 0 and cfg.eval.data:  # report: student after, target before, every source (rank 0)
            from profuser.engine.evaluate import final_report

            summary["report"] = str(final_report(cfg, export_dir, out / "report"))
        dist.barrier()
    log.close()
    return summary


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


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML experiment file (see configs/demo.yaml)")
    p.add_argument("--resume", help="checkpoint folder to resume from (default: auto-resume from output_dir)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5 schedule.kind=simul")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"profuser train: config error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    if dist.is_initialized() and dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str), flush=True)
    return int(summary.get("exit_code", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profuser train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
