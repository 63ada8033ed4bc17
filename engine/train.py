"""Progressive knowledge-fusion training of the target LLM with DeepSpeed (ZeRO stage 0-3): the recipe.

Launch (any of; no launcher-specific code, no sys.path edits):
    deepspeed engine/train.py --config configs/demo.yaml                    # 1 process per GPU
    deepspeed --num_gpus 2 engine/train.py --config configs/demo.yaml       # 2 CPU ranks (gloo) on a CPU box
    deepspeed --module profuser.engine.train --config configs/demo.yaml
    torchrun --nnodes 2 --nproc_per_node 8 ... engine/train.py --config configs/llama3-8b-multinode.yaml
    python -m profuser.engine.train --config configs/demo.yaml optim.lr=3e-5   # one process, no launcher
    profuser train --config configs/demo.yaml schedule.kind=simul

The recipe, top to bottom (one optimizer step = `optim.grad_accum` micro-steps per rank):
    setup         process group, the run's output folder claimed (trainer/output_dir.py), stores checked
                  (seconds, before any model loads), student loaded (partitioned under ZeRO-3), loaders,
                  DeepSpeed engine, with data.packing the check that the student's attention keeps a packed
                  row's examples apart (trainer/packing_check.py), resume from the latest checkpoint (its
                  data digests checked)
    train_step    w1, w2 = schedule(step): inference- / training-mode weights (a mode with w = 0 is not
                  loaded this step); fetch the window's micro-batches; trainer.step.run_window: per
                  micro-step ONE fusion_loss call over the rows of both modes, each row weighted by
                  w_m * world_size / N_m (N_m: the mode's GLOBAL token count over the window and all ranks):
                      loss = sum_m w_m L_m;  engine.backward(loss);  engine.step()
    log_step      metrics.jsonl / TensorBoard / progress bar (rank 0), periodic eval; with eval.validation
                  the validation set too, and the step with the lowest validation bits/byte so far is kept
                  (exported to <output_dir>/best-step: early stopping without stopping)
    checkpoints   every `checkpoint.every` steps, at the end and on SIGTERM (trainer/checkpoint.py); a run
                  resumes from `<output_dir>/checkpoints/latest` (checkpoint.resume=auto; README
                  "Reliability" says what is identical); a
                  non-finite loss stops the run with the step and the batch's example ids after saving
                  the state before that step
    finish        final eval, export as a transformers folder (with eval.validation: the selected step's
                  student, and selected.json saying which step), report (student, target, every source)

Ranks: the global rank owns data shards and rank 0 writes the shared files; the local rank only picks the
GPU (engine/dist.py). The module DeepSpeed wraps and the window it runs are in trainer/step.py, the
DeepSpeed config and the ZeRO-3 handling of the lm_head in trainer/deepspeed_setup.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from profuser.engine.config import MODES, TrainConfig, dump_yaml, load_config, resume_digest, to_dict
from profuser.engine.config_cli import add_config_arguments, flag_overrides, keys_help
from profuser.engine.dist import DistInfo, release_freed_memory, setup_distributed, teardown_distributed
from profuser.engine.errors import report_errors
from profuser.engine.fileio import write_text_atomic
from profuser.engine.loader.stream import BatchStream, build_streams, check_max_length, check_stores, check_vocab_rows
from profuser.engine.models import load_tokenizer, pad_id, resolve_dtype
from profuser.engine.store import WriterLock
from profuser.engine.trainer import checkpoint as ckpt
from profuser.engine.trainer import output_dir
from profuser.engine.trainer.deepspeed_setup import build_engine, deepspeed_config, full_shape, load_student
from profuser.engine.trainer.evaluate import final_report, make_evaluator
from profuser.engine.trainer.metrics_log import MetricsLogger, peak_memory_mb
from profuser.engine.trainer.model_card import write_model_card
from profuser.engine.trainer.packing_check import check_packed_attention
from profuser.engine.trainer.schedule import active_modes, fusion_weights, lr_factor, stage_of
from profuser.engine.trainer.step import NonFiniteLossError, WindowResult, run_window

# DeepSpeed 0.19 calls torch.distributed's deprecated collective names on every ZeRO step: one warning per
# step would drown the progress log
warnings.filterwarnings("ignore", message=r".*(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated",
                        category=FutureWarning)


@dataclass
class TrainingRun:
    """Everything `setup` builds; the loop advances `step`."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    engine: object
    stage: int
    tok: object
    streams: dict[str, BatchStream]
    pad_id: int
    config_yaml: str
    step: int = 0
    last_saved: int = -1
    log: MetricsLogger | None = None
    evaluator: object = None
    validator: object = None  # eval.validation: picks the exported step
    # <output_dir>/validation.json: the curve, the best step, and the step whose student best-step holds
    selection: dict = field(default_factory=lambda: {"curve": [], "best": None, "exported_step": None})
    sigterm: bool = False
    summary: dict = field(default_factory=dict)
    lock: WriterLock | None = None  # rank 0: one training run per output_dir
    inputs: dict = field(default_factory=dict)  # {part: digest} of the data (FusionLoader.input_digests)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def export_dir(self) -> Path:
        return Path(self.cfg.checkpoint.export_dir) if self.cfg.checkpoint.export_dir else self.out / "final"

    def trainer_state(self, loader_states: dict | None = None) -> dict:
        return {"step": self.step, "world_size": self.info.world_size,
                "loaders": loader_states or {m: s.state_dict() for m, s in self.streams.items()}}

    def save(self, tag: str | None = None, state: dict | None = None) -> Path:
        """Checkpoint `tag` (default: this step's, as `latest`); a named tag (a NaN checkpoint) is kept aside."""
        if tag is None:
            self.last_saved = self.step
        path = ckpt.save(self.engine, self.ckpt_dir, tag or ckpt.tag_for(self.step), state or self.trainer_state(),
                         self.config_yaml, config_digest=resume_digest(self.cfg), rank=self.info.rank,
                         world_size=self.info.world_size, update_latest=tag is None,
                         keep_last=self.cfg.checkpoint.keep_last, inputs=self.inputs)
        release_freed_memory()  # the serialization buffers (dist.py: host memory of a CPU process)
        return path

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()


# ----------------------------------------------------------------------------------------------------
# the recipe


def train(cfg: TrainConfig) -> dict:
    """Run training to cfg.optim.max_steps (resuming if possible). Returns a summary dict."""
    run = setup(cfg)
    try:
        prev_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "sigterm", True))
        try:
            exit_code = loop(run)
        finally:
            signal.signal(signal.SIGTERM, prev_handler)
        run.summary["exit_code"] = exit_code
        if exit_code == 0:
            finish(run)
    finally:
        run.close()
    return run.summary


def setup(cfg: TrainConfig) -> TrainingRun:
    info, device = setup_distributed()
    torch.manual_seed(cfg.seed + info.rank)
    config_yaml = dump_yaml(cfg)
    lock = None
    if info.rank == 0:
        out = output_dir.claim(cfg.output_dir)  # a new, empty or run-owned folder; never the user's files
        # two runs writing one output_dir would interleave checkpoints: the second one stops here, named
        lock = WriterLock(out / "train.lock", what=f"the training run in {out}").acquire()
        output_dir.write_owned(out, "config.yaml", config_yaml)
        print(f"[profuser train] resolved config (world size {info.world_size}, device {device}):\n{config_yaml}",
              file=sys.stderr, flush=True)
    print(f"[profuser train] rank {info.rank} of {info.world_size} (local rank {info.local_rank}) on {device}",
          file=sys.stderr, flush=True)

    modes = active_modes(cfg)
    check_stores(cfg, modes)  # data first: a bad store or max_length fails in seconds, before any model loads
    tok = load_tokenizer(cfg.model.student)
    check_max_length(cfg, tok, modes)
    dtype = resolve_dtype(cfg.model.dtype, device)
    lm = load_student(cfg, dtype, deepspeed_config(cfg, dtype))
    streams = build_streams(cfg, tok, modes, info.rank, info.world_size)
    loader = next(iter(streams.values())).loader
    check_vocab_rows(loader, full_shape(lm.get_output_embeddings().weight)[0], cfg.model.student)
    vocab_maps = [vm.to(device) if vm is not None else None for vm in loader.vocab_maps]
    engine, _, stage = build_engine(cfg, lm, vocab_maps, dtype)
    if cfg.data.packing:  # before the first packed step: does this model keep a row's examples apart?
        check_packed_attention(engine.module.backbone, lm.config, device, dtype, cfg.model.student)
    run = TrainingRun(cfg=cfg, info=info, device=device, engine=engine, stage=stage, tok=tok, streams=streams,
              pad_id=pad_id(tok), config_yaml=config_yaml, lock=lock,
              inputs={k: v for s in streams.values() for k, v in s.loader.input_digests().items()})
    resume(run)
    run.log = MetricsLogger(run.out, rank=info.rank, total_steps=cfg.optim.max_steps, start_step=run.step,
                            report_to=cfg.log.report_to, config=to_dict(cfg), project=cfg.log.project,
                            run_name=cfg.log.run_name, progress=cfg.log.progress)
    run.evaluator = make_evaluator(cfg, tok, device, cfg.eval.data, cfg.eval.max_examples)
    run.validator = make_evaluator(cfg, tok, device, cfg.eval.validation)
    selection = run.out / "validation.json"
    if run.validator is not None and run.step > 0 and selection.is_file():  # resumed: the curve up to this step
        # (a run killed after a validation but before that step's checkpoint redoes the steps after it)
        saved = json.loads(selection.read_text())
        curve = [c for c in saved["curve"] if c["step"] <= run.step]
        best = min(curve, key=lambda c: c["bits_per_byte"]) if curve else None
        # (a file written before exported_step was recorded is trusted)
        if best is not None and cfg.checkpoint.export and saved.get("exported_step", best["step"]) != best["step"]:
            # that step's student is not in best-step (exported under other settings, or overwritten by a step
            # this resume redoes): pick among the steps from here on, whose students can still be exported
            warnings.warn(f"{selection}: the export of validation-best step {best['step']} is not in best-step; "
                          f"the export is picked among steps > {run.step}", stacklevel=1)
            best = None
        run.selection = {"curve": curve, "best": best, "exported_step": saved.get("exported_step")}
    run.summary["start_step"] = run.step
    return run


def resume(run: TrainingRun) -> None:
    """Continue from checkpoint.resume: "auto" = the latest complete checkpoint in output_dir, if any."""
    c = run.cfg.checkpoint
    paths = ckpt.candidates(run.ckpt_dir) if c.resume == "auto" else [] if c.resume == "never" else [Path(c.resume)]
    path = ckpt.resume_point(paths, rank=run.info.rank, world_size=run.info.world_size,
                             config_digest=resume_digest(run.cfg), allow_foreign=c.allow_foreign,
                             inputs=run.inputs, allow_changed_data=c.allow_changed_data)
    if path is None:
        return
    state = ckpt.load(run.engine, path, rank=run.info.rank, allow_foreign=c.allow_foreign)
    run.step = run.last_saved = state["step"]
    for mode, sd in state["loaders"].items():
        if mode in run.streams:
            run.streams[mode].load_state_dict(sd)
    if run.info.rank == 0:
        print(f"[profuser train] resumed from {path} at step {run.step}", file=sys.stderr, flush=True)


def loop(run: TrainingRun) -> int:
    """Optimizer steps until max_steps (exit code 0) or SIGTERM (a checkpoint, exit code 143)."""
    cfg = run.cfg
    clock = {"t": time.time(), "tokens": 0}
    while run.step < cfg.optim.max_steps:
        weights = dict(zip(MODES, fusion_weights(cfg.schedule, run.step, cfg.optim.max_steps)))
        result = train_step(run, weights)
        log_step(run, result, weights, clock)
        if cfg.eval.every and run.step % cfg.eval.every == 0 and run.step < cfg.optim.max_steps:
            if run.evaluator is not None:
                run.log.log({"kind": "eval", "step": run.step, **run.evaluator(run.engine.module.lm)})
            if run.validator is not None:
                validate(run)
            run.engine.module.lm.train()
        if sigterm_on_any_rank(run):
            run.save()
            run.log.write(f"[profuser train] SIGTERM: saved checkpoint at step {run.step}, exiting")
            return 143
        if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0 and run.step < cfg.optim.max_steps:
            run.save()
    return 0


def train_step(run: TrainingRun, weights: dict) -> WindowResult:
    """One optimizer step over a window of grad_accum micro-batches of every active mode."""
    step_modes = [m for m in run.streams if weights[m] > 0]
    window_loaders = {m: s.state_dict() for m, s in run.streams.items()}  # for a NaN checkpoint
    window_rng = ckpt.rng_state()
    # the whole window first, so the global token count of each mode is known before any backward
    window = [[run.streams[m].next() for m in step_modes] for _ in range(run.cfg.optim.grad_accum)]

    def on_nonfinite(batch, loss):
        path = run.save(f"nan-{ckpt.tag_for(run.step)}", dict(run.trainer_state(window_loaders), rng=window_rng))
        raise NonFiniteLossError(f"non-finite loss at step {run.step} (rank {run.info.rank}, loss {loss}); "
                                 f"example ids of the batch: {batch['example_ids']}; state before this step "
                                 f"saved in {path}")

    result = run_window(run.engine, window, step_modes, weights, pad_id=run.pad_id, device=run.device,
                        on_nonfinite=on_nonfinite)
    run.step += 1
    return result


def log_step(run: TrainingRun, result: WindowResult, weights: dict, clock: dict) -> None:
    """A metrics row every log.every steps (values global over ranks and the window)."""
    cfg, step = run.cfg, run.step
    clock["tokens"] += result.tokens
    if step % cfg.log.every and step != cfg.optim.max_steps:
        return
    now = time.time()
    row = {"kind": "train", "step": step, "loss": result.loss, "w_infer": weights["infer"],
           "w_train": weights["train"], "stage": stage_of(cfg.schedule, step - 1, cfg.optim.max_steps),
           "lr": cfg.optim.lr * lr_factor(cfg.optim, step - 1), "tokens": result.tokens,
           "tokens_per_s": clock["tokens"] / max(now - clock["t"], 1e-9), "peak_mem_mb": peak_memory_mb()}
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    for mode, totals in result.modes.items():
        if totals.tokens > 0:
            row.update({f"loss_{mode}": totals.loss, f"ce_{mode}": totals.ce, f"kd_{mode}": totals.kd,
                        f"kept_mass_{mode}": totals.kept_mass, f"student_mass_{mode}": totals.student_mass})
    run.log.log(row)
    run.log.progress(cfg.log.every if step % cfg.log.every == 0 else step % cfg.log.every, {
        "loss": f"{row['loss']:.4f}", **{k: f"{row[k]:.3f}" for k in row if k[:3] in ("ce_", "kd_")},
        "tok/s": f"{row['tokens_per_s']:.0f}", "mem": f"{row['peak_mem_mb']:.0f}M"})
    clock.update(t=now, tokens=0)
    run.summary["last"] = row


def sigterm_on_any_rank(run: TrainingRun) -> bool:
    """SIGTERM (preemption, scancel) on any rank stops every rank after the same step."""
    flag = torch.tensor([1.0 if run.sigterm else 0.0], device=run.device)  # on device: NCCL reduces CUDA only
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def export(run: TrainingRun, out: Path) -> Path:
    """The engine's student as a transformers folder `out` (ZeRO-3 consolidates it from this step's checkpoint;
    stages 0-2 hold the whole module and need none)."""
    if run.info.rank == 0 and out.resolve().parent != run.out.resolve() and out.is_dir() and any(out.iterdir()) \
            and not (out / ckpt.EXPORT_MARKER).is_file():  # checkpoint.export_dir names a folder of its own
        raise output_dir.OutputDirError(f"checkpoint.export_dir={out}: not empty and not a profuser export (no "
                                        f"{ckpt.EXPORT_MARKER}): its files are not this run's to replace")
    checkpoint = None
    if run.stage == 3:
        checkpoint = run.save() if run.last_saved != run.step else run.ckpt_dir / ckpt.tag_for(run.step)
    path = ckpt.export_student(run.engine.module.lm, run.tok, checkpoint, out, stage=run.stage, rank=run.info.rank,
                               dtype=getattr(torch, run.cfg.checkpoint.export_dtype))
    release_freed_memory()
    return path


def validate(run: TrainingRun) -> None:
    """Validation bits/byte of this step; the best step so far is exported to <output_dir>/best-step (not to
    the export folder: that appears only when the run has finished, so a killed run is never taken for done)."""
    res = run.validator(run.engine.module.lm)
    run.log.log({"kind": "validation", "step": run.step, **res})
    sel = run.selection
    sel["curve"].append({"step": run.step, "bits_per_byte": res["bits_per_byte"]})
    if sel["best"] is None or res["bits_per_byte"] < sel["best"]["bits_per_byte"]:
        sel["best"] = {"step": run.step, "bits_per_byte": res["bits_per_byte"]}
        if run.cfg.checkpoint.export:
            export(run, run.out / "best-step")
            sel["exported_step"] = run.step
    if run.info.rank == 0:
        write_text_atomic(run.out / "validation.json", json.dumps(sel, indent=1))


def finish(run: TrainingRun) -> None:
    """Final checkpoint, eval of the engine's own (possibly partitioned) student, export and report."""
    cfg = run.cfg
    final = run.save() if run.last_saved != run.step else run.ckpt_dir / ckpt.tag_for(run.step)
    run.summary["checkpoint"] = str(final)
    if run.evaluator is not None:
        res = run.evaluator(run.engine.module.lm)
        run.log.log({"kind": "eval", "step": run.step, **res})
        run.summary["eval"] = res
    if run.validator is not None:
        validate(run)
        run.summary["selected"] = run.selection["best"]
    if cfg.checkpoint.export:
        export_dir = run.export_dir
        if run.validator is None:
            export(run, export_dir)
        elif run.info.rank == 0:  # the selected step's student becomes the export
            shutil.rmtree(export_dir, ignore_errors=True)
            os.replace(run.out / "best-step", export_dir)
            write_text_atomic(export_dir / "selected.json", json.dumps(
                {**run.selection["best"], "validation": cfg.eval.validation, "max_steps": cfg.optim.max_steps,
                 "curve": run.selection["curve"]}, indent=1))
        dist.barrier()
        run.summary["export"] = str(export_dir)
        if run.info.rank == 0 and cfg.eval.data:  # student after, target before, every source
            run.summary["report"] = str(final_report(cfg, export_dir, run.out / "report"))
        if run.info.rank == 0:
            write_model_card(export_dir, cfg, run.summary, run.inputs)
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = keys_help()
    p.add_argument("--config", help="YAML experiment file, or a shipped config's name (demo, study, ...)")
    add_config_arguments(p, TrainConfig, config_and_overrides=False)  # --optim.lr 3e-5 == optim.lr=3e-5
    p.add_argument("--resume", help="checkpoint folder to resume from (default: auto-resume from output_dir)")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="resume although the stores, the vote or a vocabulary map changed since the checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5 schedule.kind=simul")


def run_command(args: argparse.Namespace) -> int:
    overrides = flag_overrides(args) + list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.allow_changed_data:
        overrides.append("checkpoint.allow_changed_data=true")
    cfg = load_config(args.config, overrides)  # a bad value fails here, before anything starts
    try:
        summary = train(cfg)
        if dist.is_initialized() and dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str), flush=True)
    finally:
        teardown_distributed()
    return int(summary.get("exit_code", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profuser train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return report_errors("profuser train", run_command, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
