"""Training-step benchmark: the ProFuser engine against a FuseLLM-style loop, same student, same batches.

    python bench/bench_train.py                     # SmolLM2-135M architecture, B=4, L=128, T=2, K=10
    python bench/bench_train.py --batch 8 --length 256 --steps 6
    python bench/bench_train.py --variants fusellm,engine,engine-lora --tag lora   # a LoRA step vs a full step

All variants train the same student (SmolLM2-135M-Instruct: 134.5M parameters, 49,152-token
vocabulary, tied embeddings) from the same weights on the same seeded batches, one optimizer step per
batch (AdamW, lr 1e-5), with lam = 0.9 and T = 2 teachers of top-K = 10 entries (one in the student's
vocabulary, one in Gemma-3's 262,144-token vocabulary mapped by a vocab map), one mode:

  engine    profuser.engine.train: FusionStep under DeepSpeed ZeRO stage 0 (one process: nothing to
            shard), the backbone stops at hidden states, fusion_loss on the labelled rows only (chunked
            backend on CPU, Triton on GPU): never a [B, L, V] tensor.
  engine-zero3  the same under ZeRO-3 at world size 1: shows ZeRO-3's own cost (parameters gathered
            into fresh buffers every forward), which pays off only across ranks.
  engine-lora   the engine training a LoRA adapter (model.lora.r=16 on q/k/v/o, peft) instead of every
            parameter: the base and lm_head frozen (no gradients or AdamW states for them). Its loss is
            the same objective on fewer trainable parameters, so compare its memory and time, not its loss.
  fusellm   what an HF Trainer compute_loss override does in FuseLLM / FuseChat: full logits [B, L, V],
            every teacher densified to a [B, L, V] distribution in the student vocabulary (mapped,
            renormalized top-K), fused by the same per-position teacher weights, then
            lam * CE + (1 - lam) * soft cross-entropy, plain torch autograd, torch AdamW.

Each variant runs in its own process (peak memory is per process): tokens/s counts target tokens
(labels != -100) over the timed steps (after --warmup steps); peak memory is the step's peak above the
state after model + optimizer setup (RSS high-water mark on CPU, max_memory_allocated on GPU), and the total
peak includes that state (parameters, gradients, optimizer states: what LoRA saves).
Output: bench/results/train_<cpu|gpu>_b<B>_l<L>.json and a Markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import harness

RESULTS = Path(__file__).resolve().parent / "results"
V_GEMMA, LAM = 262144, 0.9


def make_batches(n: int, B: int, L: int, T: int, K: int, V: int, seed: int = 0) -> tuple[list[dict], list]:
    """n loader-format batches (docs/contracts.md section 4) and the vocab maps, seeded."""
    from profuser.engine.config import MODE_ID

    g = torch.Generator().manual_seed(seed)
    vm = torch.randint(0, V, (V_GEMMA,), generator=g, dtype=torch.int32)
    vm[torch.rand(V_GEMMA, generator=g) < 0.3] = -1  # unmapped teacher ids
    batches = []
    for i in range(n):
        ids = torch.randint(10, V, (B, L), generator=g)
        labels = torch.full((B, L), -100)
        labels[:, L // 4:L - 1] = ids[:, L // 4 + 1:]  # the response: the last 3/4 of the sequence
        tids = torch.stack([torch.randint(0, V, (B, L, K), generator=g),
                            torch.randint(0, V_GEMMA, (B, L, K), generator=g)])[:T]
        tlp = torch.log_softmax(torch.randn(T, B, L, K + 4, generator=g) * 2, -1)[..., :K].sort(-1, True).values
        batches.append({"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "labels": labels,
                        "teacher_ids": tids.to(torch.int32), "teacher_logprobs": tlp.to(torch.float16),
                        "teacher_weights": torch.rand(T, B, L, generator=g),
                        "mode": torch.full((B,), MODE_ID["train"]),  # run_window trains them as training mode
                        "example_ids": [f"b{i}-{b}" for b in range(B)], "n_tokens": int((labels != -100).sum())})
    return batches, [None, vm][:T]


def load_student(device: torch.device, dtype: torch.dtype):
    from profuser.engine.models import load_model

    lm = load_model("smollm2-135m-instruct", dtype=dtype).to(device)
    lm.config.use_cache = False
    return lm.train()


def fusellm_loss(lm, batch: dict, vocab_maps: list) -> torch.Tensor:
    """FuseLLM-style compute_loss: dense [B, L, V] logits and one dense [B, L, V] target per teacher."""
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # [B, L, V]
    B, L, V = logits.shape
    labels = batch["labels"]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    fused = torch.zeros(B, L, V, device=logits.device)  # the fused teacher distribution
    wsum = torch.zeros(B, L, 1, device=logits.device)
    for t, vm in enumerate(vocab_maps):
        ids = batch["teacher_ids"][t].long()  # [B, L, K]
        if vm is not None:
            ids = torch.where(ids >= 0, vm.long()[ids.clamp_min(0)], ids)
        p = batch["teacher_logprobs"][t].float().exp() * (ids >= 0)
        dense = torch.zeros(B, L, V, device=logits.device).scatter_add_(-1, ids.clamp_min(0), p)  # [B, L, V]
        dense = dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)  # renormalized top-K
        w = batch["teacher_weights"][t][..., None] * (p.sum(-1, keepdim=True) > 0)
        fused += w * dense
        wsum += w
    fused = fused / wsum.clamp_min(1e-12)
    mask = (labels != -100) & (wsum[..., 0] > 0)
    kd = -(fused * torch.log_softmax(logits, -1)).sum(-1)[mask].mean()
    return LAM * ce + (1 - LAM) * kd


def measure_variant(variant: str, lm, batches: list[dict], vms: list, device: torch.device, dtype: torch.dtype,
                    warmup: int, pad_id: int = 2) -> dict:
    """Train `lm` on `batches` with one variant (module doc), the first `warmup` steps untimed: tokens/s
    and peak memory above the state after setup (and after the warmup steps, so optimizer state exists)."""
    if variant.startswith("engine"):
        from profuser.engine.config import load_config
        from profuser.engine.dist import setup_distributed
        from profuser.engine.trainer.deepspeed_setup import build_engine
        from profuser.engine.trainer.step import run_window

        setup_distributed()
        B = batches[0]["input_ids"].shape[0]
        cfg = load_config(None, ["optim.lr=1e-5", "optim.grad_clip=1.0", "optim.decay=constant",
                                 f"data.micro_batch_size={B}",
                                 f"deepspeed.zero_optimization.stage={3 if variant == 'engine-zero3' else 0}"]
                          + (["model.lora.r=16"] if variant == "engine-lora" else []))
        if cfg.model.lora.r:  # as training's load_student does (trainer/deepspeed_setup.py)
            from profuser.engine.trainer.deepspeed_setup import add_lora

            add_lora(lm, cfg.model.lora)
        engine, _, _ = build_engine(cfg, lm, [v.to(device) if v is not None else None for v in vms], dtype)

        def step(b):
            return run_window(engine, [[b]], ["train"], {"infer": 0.0, "train": 1.0}, pad_id=pad_id,
                              device=device).loss
    else:
        engine = None
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-5)
        vms_d = [v.to(device) if v is not None else None for v in vms]

        def step(b):
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            loss = fusellm_loss(lm, b, vms_d)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
    for b in batches[:warmup]:  # a variant that trains on nothing (a zero loss) would time nothing real
        if not float(step(b)) > 0:
            raise RuntimeError(f"bench_train: {variant}: a warmup step's loss is not positive (the batches' rows "
                               "are not weighted: their `mode` is not the one trained?)")
    mem = harness.PeakMemory(device)
    tokens, t0 = 0, time.perf_counter()
    for b in batches[warmup:]:
        step(b)
        tokens += b["n_tokens"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    steps = len(batches) - warmup
    out = {"variant": variant, "tokens_per_s": tokens / dt, "s_per_step": dt / steps, "peak_mem_mb": mem.peak_mb(),
           "total_peak_mem_mb": mem.total_peak_mb(), "tokens": tokens,
           "trainable_params_m": sum(p.numel() for p in lm.parameters() if p.requires_grad) / 1e6}
    if engine is not None:
        engine.destroy()  # another engine may be built in this process (ZeRO-3 hooks must go)
    return out


def one(variant: str, args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from profuser.engine.dist import keep_freed_memory

        keep_freed_memory()  # a no-op under PROFUSER_MALLOC=system (set by main from --malloc)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    batches, vms = make_batches(args.warmup + args.steps, args.batch, args.length, 2, args.k, 49152)
    return measure_variant(variant, load_student(device, dtype), batches, vms, device, dtype, args.warmup)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default="fusellm,engine,engine-zero3,engine-lora")
    ap.add_argument("--malloc", choices=["system", "keep"], default="system",
                    help="CPU only, every variant alike: glibc's default allocator (the README's table) or "
                         "freed buffers kept for reuse, as `profuser train` runs (engine/dist.py)")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name (a run that must not replace the "
                    "default run's file, e.g. one on a loaded machine)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args)), flush=True)
        return 0
    rows = []
    for variant in args.variants.split(","):
        argv = [__file__, "--one", variant, "--batch", str(args.batch), "--length", str(args.length),
                "--k", str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--malloc", args.malloc]
        # PROFUSER_MALLOC: every variant alike (the engine's own setup would otherwise apply "keep")
        env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR=os.environ.get(
            "DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu"), HF_HUB_OFFLINE="1",
            PROFUSER_MALLOC=args.malloc)
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=3600)
        row = next((json.loads(x[4:]) for x in p.stdout.splitlines() if x.startswith("ROW ")), None)
        if row is None:
            row = {"variant": variant, "status": "failed", "note": (p.stderr or p.stdout)[-600:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        if "tokens_per_s" in r and "tokens_per_s" in base:
            r["speed_vs_fusellm"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["mem_vs_fusellm"] = r["peak_mem_mb"] / base["peak_mem_mb"]
    meta = {"machine": harness.machine_name(), "student": "smollm2-135m-instruct (134.5M, V=49152)",
            "batch": args.batch, "length": args.length, "teachers": "2 (student vocab + Gemma-3 262k mapped)",
            "k": args.k, "steps": args.steps, "warmup": args.warmup, "malloc": args.malloc,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_1m_at_end": os.getloadavg()[0]}
    tag = ("" if args.malloc == "system" else f"_malloc-{args.malloc}") + (f"_{args.tag}" if args.tag else "")
    out = RESULTS / f"train_{harness.machine_slug()}_b{args.batch}_l{args.length}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta['machine']}; B={args.batch}, L={args.length}, K={args.k}, {args.steps} timed steps\n")
    print("| variant | trainable params (M) | target tokens/s | s/step | peak memory above setup (MiB) "
          "| total peak (MiB) | speed vs FuseLLM | memory vs FuseLLM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"| {r['variant']} | {r['trainable_params_m']:.1f} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} "
                  f"| {r['peak_mem_mb']:.0f} | {r['total_peak_mem_mb']:.0f} | {r.get('speed_vs_fusellm', 1):.2f}x "
                  f"| {r.get('mem_vs_fusellm', 1):.2f}x |")
        else:
            print(f"| {r['variant']} | failed: {r.get('note', '')[:80]} |")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
