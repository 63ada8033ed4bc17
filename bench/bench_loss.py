"""Fusion-loss benchmark: every backend, a naive FuseLLM-style torch path and the peers, side by side.

    python bench/bench_loss.py                    # default cases for this machine (CPU or GPU)
    python bench/bench_loss.py --cases smollm2-135m:4096 --methods naive,chunked --reps 3

Each (case, method) runs in its own subprocess (harness.run_subprocess) on the same seeded inputs and
reports forward+backward time (median of --reps after one warmup call) and peak memory above the
inputs. Ratios are to `naive` of the same case. Output: bench/results/loss_<cpu|gpu>.json, a PNG plot
beside it, and a Markdown table on stdout.

Methods (inputs: hidden [N, H], weight [V, H], labels [N], T teachers' top-K ids / logprobs, weights [T, N]):
  naive       FuseLLM-style: full logits, each teacher densified to [N, V], fused, KL + CE (plain torch)
  reference   profuser backend "reference" (dense, the test ground truth)
  chunked     profuser backend "chunked"
  triton      profuser backend "triton" (GPU only; on CPU Triton runs only in its interpreter)
  liger_jsd   Liger-Kernel LigerFusedLinearJSDLoss(beta=0: forward KL, weight_hard_loss=lam), compiled
              and eager. It takes the teacher as hidden + lm_head, so it gets ONE dense teacher given as a
              [N, H] x [V, H] projection of the same shape as the student: it does one more GEMM than
              the others, and cannot take sparse, several or different-vocabulary teachers.
  cce_ce      Cut Cross-Entropy linear_cross_entropy, CE part only (impl torch_compile on CPU, cce on GPU).
  liger_flce  Liger-Kernel LigerFusedLinearCrossEntropyLoss, CE part only (Triton: GPU only).
  liger_fljsd Liger-Kernel LigerFusedLinearJSD (Triton op, jsd_beta=0: forward KL) with ONE dense teacher
              given as hidden + lm_head, as liger_jsd (GPU only; KD only, no CE term).
  triton_det  profuser backend "triton" with deterministic=True (no atomics; GPU only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import harness
import shapes

METHODS = ["naive", "reference", "chunked", "triton", "liger_jsd_compiled", "liger_jsd_eager", "cce_ce"]
GPU_ONLY = {"triton", "triton_det", "liger_flce", "liger_fljsd"}  # Triton without its interpreter
CPU_CASES = ["smollm2-135m:4096", "gemma3-270m:1024"]
GPU_CASES = ["smollm2-135m:16384", "llama3-8b:16384"]
T, K, LAM, TEMP = 3, 8, 0.9, 1.0


def make_inputs(model: str, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Seeded inputs; same for every method of a case. Teachers: top-K of a random distribution."""
    shp = shapes.get(model)
    g = torch.Generator().manual_seed(seed)
    H, V = shp.hidden, shp.vocab
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100
    ids = torch.randint(0, V, (T, N, K), generator=g, dtype=torch.int64).to(torch.int32)
    lp = torch.log_softmax(torch.randn(T, N, K, generator=g) * 2, -1).sort(-1, descending=True).values - 0.2
    tw = torch.rand(T, N, generator=g)
    out = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), labels=labels, teacher_ids=ids,
               teacher_logprobs=lp.to(torch.float16), teacher_weights=tw)
    return {k: v.to(device) for k, v in out.items()}


def naive_loss(hidden, weight, labels, teacher_ids, teacher_logprobs, teacher_weights):
    """What FuseLLM-style code does: materialize logits, densify each teacher to [N, V], fuse, KL + CE."""
    logits = (hidden @ weight.t()).float()
    N, V = logits.shape
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    logq = torch.log_softmax(logits / TEMP, -1)
    wn = teacher_weights / teacher_weights.sum(0).clamp_min(1e-30)
    target = torch.zeros(N, V, device=logits.device)
    for t in range(teacher_ids.shape[0]):
        p = torch.softmax(teacher_logprobs[t].float() / TEMP, -1)
        dense = torch.zeros(N, V, device=logits.device).scatter_add_(1, teacher_ids[t].long(), p)
        target = target + wn[t].unsqueeze(1) * dense
    kd = (torch.xlogy(target, target) - target * logq).sum(-1) * TEMP**2
    n = valid.sum().clamp_min(1)
    return (LAM * ce + (1 - LAM) * (kd * valid).sum()) / n


def build_method(method: str, inp: dict, device: torch.device):
    """Return (fn running forward+backward and returning the loss value, note) or raise RuntimeError(skip)."""
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    args = (inp["labels"], inp["teacher_ids"], inp["teacher_logprobs"], inp["teacher_weights"])
    note = ""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if method in GPU_ONLY and device.type != "cuda" and not (interpreted and method.startswith("triton")):
        raise RuntimeError("Triton needs a GPU (on CPU it only runs in its interpreter)")
    if method in ("reference", "chunked", "triton", "triton_det"):
        from profuser.kernels import fusion_loss

        backend = "triton" if method == "triton_det" else method

        def loss_fn():
            return fusion_loss(h, w, *args, lam=LAM, temperature=TEMP, backend=backend,
                               deterministic=method == "triton_det", validate=False)
    elif method == "naive":
        def loss_fn():
            return naive_loss(h, w, *args)
    elif method.startswith("liger_jsd"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        compiled = method.endswith("compiled")
        g = torch.Generator().manual_seed(1)
        th = torch.randn(h.shape, generator=g).to(h.dtype).to(device)
        tw = (torch.randn(w.shape, generator=g) / h.shape[1] ** 0.5).to(w.dtype).to(device)
        mod = LigerFusedLinearJSDLoss(weight_hard_loss=LAM, weight_soft_loss=1 - LAM, beta=0.0,
                                      temperature=TEMP, compiled=compiled, chunk_size=1024)
        note = "1 dense teacher [N,H]x[V,H]; different loss"

        def loss_fn():
            return mod(h, w, th, tw, inp["labels"])
    elif method == "liger_fljsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        g = torch.Generator().manual_seed(1)
        th = torch.randn(h.shape, generator=g).to(h.dtype).to(device)
        tw = (torch.randn(w.shape, generator=g) / h.shape[1] ** 0.5).to(w.dtype).to(device)
        mod = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMP)
        note = "1 dense teacher [N,H]x[V,H]; KD only"

        def loss_fn():
            return mod(h, w, th, tw, inp["labels"])
    elif method == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss()
        note = "CE only"

        def loss_fn():
            return mod(w, h, inp["labels"])
    elif method == "cce_ce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"
        note = f"CE only, impl={impl}"

        def loss_fn():
            return linear_cross_entropy(h, w, inp["labels"], impl=impl)
    else:
        raise ValueError(f"unknown method {method!r}")

    def step():
        h.grad = None
        w.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step, note


def run_one(case: str, method: str, dtype_name: str, reps: int) -> None:
    """Child process: measure one (case, method) and print a ROW line."""
    model, n = case.split(":")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    shp = shapes.get(model)
    row = harness.Row(bench="loss", case=case, method=method,
                      shape=dict(model=model, N=int(n), H=shp.hidden, V=shp.vocab, T=T, K=K),
                      dtype=dtype_name, device=device.type, machine=harness.machine_name(),
                      timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    inp = make_inputs(model, int(n), dtype, device)
    try:
        step, row.note = build_method(method, inp, device)
    except (RuntimeError, ImportError) as e:
        row.status, row.note = "skipped", str(e)[:200]
        harness.emit(row)
        return
    mem = harness.PeakMemory(device)  # after inputs and any method setup (e.g. Liger's teacher tensors)
    losses = []
    first, times = harness.time_calls(lambda: losses.append(step()), device, warmup=1, reps=reps)
    row.first_call_ms, row.times_ms = first, times
    row.time_ms = sorted(times)[len(times) // 2]
    row.peak_mem_mb = mem.peak_mb()
    row.loss = losses[-1]
    harness.emit(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma list of model:N (default: per machine)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    dtype = a.dtype or ("bfloat16" if gpu else "float32")
    if a.one:
        run_one(a.one[0], a.one[1], dtype, a.reps)
        return
    cases = a.cases.split(",") if a.cases else (GPU_CASES if gpu else CPU_CASES)
    rows = []
    for case in cases:
        model = case.split(":")[0]
        for method in a.methods.split(","):
            base = harness.Row(bench="loss", case=case, method=method, shape={"model": model}, dtype=dtype,
                               device="cuda" if gpu else "cpu", machine=harness.machine_name())
            if shapes.get(model).gpu_only and not gpu:
                base.status, base.note = "skipped", "GPU-only shape"
                rows.append(base)
                continue
            if method == "reference" and shapes.get(model).vocab > 100_000 and not gpu:
                base.status, base.note = "skipped", "dense [N,V] x several: too big for this CPU case"
                rows.append(base)
                continue
            print(f"[bench_loss] {case} {method} ...", file=sys.stderr, flush=True)
            res = harness.run_subprocess([os.path.abspath(__file__), "--one", case, method, "--dtype", dtype,
                                          "--reps", str(a.reps)], a.timeout)
            fields = {k: v for k, v in res.items() if k in harness.Row.__dataclass_fields__}
            rows.append(harness.Row(**{**base.__dict__, **fields}))
    harness.add_ratios(rows)
    slug = harness.machine_slug()
    path = os.path.join(a.out, f"loss_{slug}.json")
    meta = dict(machine=harness.machine_name(), T=T, K=K, lam=LAM, temperature=TEMP, reps=a.reps,
                load_avg=os.getloadavg(), cmd=" ".join(sys.argv))
    harness.write_json(rows, path, meta)
    harness.plot(rows, os.path.join(a.out, f"loss_{slug}.png"),
                 f"fusion loss fwd+bwd, {harness.machine_name()}")
    print(f"\nMachine: {harness.machine_name()}; T={T}, K={K}, dtype {dtype}; results: {path}\n")
    print(harness.markdown_table(rows))


if __name__ == "__main__":
    main()
