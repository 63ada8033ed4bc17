"""Progressive knowledge-fusion training of the target LLM with DeepSpeed (ZeRO stage 0-3).

Launch (any of):
    deepspeed engine/train.py --config configs/demo.yaml                    # 1 process per GPU
    deepspeed --num_gpus 2 engine/train.py --config configs/demo.yaml       # 2 CPU ranks (gloo) on a CPU box
    torchrun --nproc_per_node 8 engine/train.py --config configs/llama3-8b-multinode.yaml
    python engine/train.py --config configs/demo.yaml optim.lr=3e-5         # one process, no launcher
    profuser train --config configs/demo.yaml schedule.kind=simul

The loop, top to bottom (one optimizer step = `optim.grad_accum` micro-steps per rank; the step itself,
FusionStep and run_window, is engine/step.py):
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
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from profuser.engine import checkpoint as ckpt  # noqa: E402
from profuser.engine.config import ConfigError, TrainConfig, dump_yaml, load_config  # noqa: E402
from profuser.engine.evaluate import make_evaluator  # noqa: E402
from profuser.engine.metrics import MetricsLogger, peak_memory_mb  # noqa: E402
from profuser.engine.schedule import fusion_weights, lr_factor, stage_of  # noqa: E402
from profuser.engine.step import (MODES, FusionStep, NonFiniteLossError, build_engine,  # noqa: E402,F401
                                  deepspeed_config, full_shape, merge_modes, run_window)

# DeepSpeed 0.19 calls torch.distributed's deprecated collective names on every ZeRO step: one warning per
# step would drown the progress log
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated",
                        category=FutureWarning)



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


def teardown_distributed() -> None:
    """Destroy the process group before the interpreter exits.

    A gloo group left to the interpreter's exit can be torn down after its worker threads' owners are gone:
    the rank then aborts with "terminate called without an active exception" (seen on CI, 1 run in ~20),
    and the launcher reports the whole run as failed.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


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
    try:
        summary = train(cfg)
        if dist.is_initialized() and dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str), flush=True)
    finally:
        teardown_distributed()
    return int(summary.get("exit_code", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profuser train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
