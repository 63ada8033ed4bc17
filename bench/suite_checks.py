"""Correctness section of bench/gpu_suite.py: every fusion-loss backend against the reference, on the device.

Fresh random inputs for every case (never zeros; seeded): hidden [N, H], weight [V, H] / sqrt(H), labels
with ignored rows, T teachers' top-K ids (empty slots, repeats), log-probabilities that leave a tail, teacher
weights with zeros, vocab maps with unmapped and many-to-one entries. Ground truth: the reference backend
in float64 on the device when its dense [N, V] tensors fit (else float32, upcast), and the bar a backend
must meet is the project's: its error against the ground truth at most twice the reference's own error in
the input dtype (plain torch, what a user would otherwise run), plus a small absolute slack, for the loss and
every gradient.

    rows = run_checks(device, dry)   # one row per (case, backend, dtype): errors, bar, ok
"""

from __future__ import annotations

import math

import torch

from profuser.kernels import fusion_loss

# name: (N, H, V, T, K, options, maps); the dry run divides N and caps V (see cases())
CASES = {
    "ragged": (1000, 72, 5003, 3, 8, dict(), True),
    "gemma-vocab": (256, 256, 262144, 2, 8, dict(), True),
    "softcap+temperature": (777, 96, 32003, 3, 8, dict(softcap=30.0, temperature=1.5, lam=0.5), True),
    "tail-bucket": (513, 64, 20011, 3, 8, dict(missing_mass="tail_bucket", lam=0.3), True),
    "tail-softcap-bias": (300, 64, 9001, 2, 4, dict(missing_mass="tail_bucket", softcap=20.0, bias=True), False),
}
BACKENDS = [("chunked", {}), ("triton", {}), ("triton", dict(deterministic=True))]


def cases(dry: bool) -> dict:
    if not dry:
        return CASES
    return {k: (min(n, 48), min(h, 40), min(v, 301), t, kk, o, m) for k, (n, h, v, t, kk, o, m) in CASES.items()}


def make_inputs(N, H, V, T, K, maps, bias, device, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H) * 2
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.15] = -100
    Vt = V + 37 if maps else V
    ids = torch.randint(0, Vt, (T, N, K), generator=g)
    ids[:, :, 0] = torch.where(labels >= 0, labels, 0)  # teachers often agree with the gold token
    ids[:, :, -1] = ids[:, :, 1]  # repeats
    ids[torch.rand(T, N, K, generator=g) < 0.15] = -1
    lp = (torch.log_softmax(torch.randn(T, N, K, generator=g) * 2, -1) - 0.3).sort(-1, descending=True).values
    tw = torch.rand(T, N, generator=g) + 0.05
    tw[0, ::5] = 0.0
    vms = None
    if maps:
        vms = []
        for t in range(T):
            m = torch.randint(0, V, (Vt,), generator=g)
            m[torch.rand(Vt, generator=g) < 0.15] = -1
            vms.append(m.to(device) if t % 2 == 0 else None)
            if t % 2:
                ids[t] = torch.where(ids[t] >= V, ids[t] % V, ids[t])
    return dict(hidden=hidden.to(device), weight=weight.to(device), bias=None if b is None else b.to(device),
                labels=labels.to(device), teacher_ids=ids.to(torch.int32).to(device),
                teacher_logprobs=lp.to(torch.float16).to(device), teacher_weights=tw.to(device), vocab_maps=vms)


def loss_and_grads(inp, dtype, backend, opts, **extra):
    h = inp["hidden"].to(dtype).detach().requires_grad_()
    w = inp["weight"].to(dtype).detach().requires_grad_()
    b = None if inp["bias"] is None else inp["bias"].to(dtype).detach().requires_grad_()
    loss = fusion_loss(h, w, inp["labels"], inp["teacher_ids"], inp["teacher_logprobs"], inp["teacher_weights"],
                       vocab_maps=inp["vocab_maps"], bias=b, backend=backend, **opts, **extra)
    loss.backward()
    out = {"loss": loss.detach(), "d_hidden": h.grad, "d_weight": w.grad}
    if b is not None:
        out["d_bias"] = b.grad
    return out


def _dense_fits(N, V, device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return N * V * 8 * 8 < 0.6 * free  # ~8 float64 [N, V] tensors inside the reference and its autograd


def run_checks(device: torch.device, dry: bool) -> list[dict]:
    rows = []
    dtypes = [torch.float32, torch.bfloat16]
    for seed, (name, (N, H, V, T, K, opts, maps)) in enumerate(cases(dry).items()):
        opts = dict(opts)
        bias = opts.pop("bias", False)
        inp = make_inputs(N, H, V, T, K, maps, bias, device, seed)
        gt_dtype = torch.float64 if _dense_fits(N, V, device) else torch.float32
        gt = loss_and_grads(inp, gt_dtype, "reference", opts)
        for dtype in dtypes:
            ref = loss_and_grads(inp, dtype, "reference", opts)  # torch's own error in this dtype: the bar
            for backend, extra in BACKENDS:
                label = backend + ("-deterministic" if extra.get("deterministic") else "")
                row = {"case": name, "backend": label, "dtype": str(dtype).replace("torch.", ""),
                       "shape": dict(N=N, H=H, V=V, T=T, K=K), "options": opts, "ground_truth": str(gt_dtype)}
                try:
                    got = loss_and_grads(inp, dtype, backend, opts, **extra)
                except Exception as e:  # noqa: BLE001 - a failing backend is a result, not a crash
                    rows.append(dict(row, ok=False, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
                ok = True
                for k, g in gt.items():
                    g64 = g.double()
                    err = (got[k].double() - g64).abs().max().item()
                    ref_err = (ref[k].double() - g64).abs().max().item()
                    slack = (1e-6 if dtype == torch.float32 else 1e-3) * max(1.0, g64.abs().max().item())
                    bar = 2 * ref_err + slack
                    finite = bool(torch.isfinite(got[k]).all())
                    row[k] = {"err": err, "torch_err": ref_err, "bar": bar}
                    ok = ok and finite and err <= bar
                row["ok"] = ok
                rows.append(row)
        del inp, gt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def sync_check(device: torch.device) -> dict:
    """Host syncs of one engine micro-step on the device (the student's own forward excluded): the Python
    entry points (engine/tools/sync_counter.py) and, on CUDA, torch's sync debug mode (C++ ops too)."""
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from profuser.engine.config import MODE_ID, LossConfig
    from profuser.engine.tools.sync_counter import count_syncs, paused_forward
    from profuser.engine.trainer.step import FusionStep, merge_modes

    torch.manual_seed(0)
    V, T, K = 503, 2, 4
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).to(device)
    inner = lm.model.forward
    cuda = device.type == "cuda"

    def quiet_backbone(*a, **k):  # transformers' mask checks read the device: not ours, not counted
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        try:
            return inner(*a, **k)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")

    lm.model.forward = quiet_backbone
    paused_forward(lm.model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for mode, B, L in (("infer", 2, 33), ("train", 3, 41)):
        ids = torch.randint(1, V, (B, L), generator=g)
        labels = torch.full((B, L), -100)
        labels[:, 5:L - 1] = ids[:, 6:]
        batches.append({"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "labels": labels,
                        "teacher_ids": torch.randint(0, V, (T, B, L, K), generator=g).to(torch.int32),
                        "teacher_logprobs": torch.log_softmax(torch.randn(T, B, L, K, generator=g), -1).half(),
                        "teacher_weights": torch.rand(T, B, L, generator=g),
                        "mode": torch.full((B,), MODE_ID[mode]), "example_ids": [],
                        "n_tokens": int((labels >= 0).sum())})
    batch = merge_modes(batches, pad_id=0)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out = {}
    for backend in ("chunked", "triton"):
        step = FusionStep(lm, LossConfig(backend=backend), [None, None])
        scale = torch.tensor([0.01, 0.02], device=device)
        step(batch, scale)[0].backward()  # compile and warm up outside the count
        with warnings.catch_warnings(record=True) as caught, count_syncs() as counts:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, _ = step(batch, scale)
                loss.backward()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        cpp = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
        out[backend] = {"python_entry_points": counts, "cuda_sync_warnings": len(cpp), "first": cpp[:3],
                        "ok": not counts and not cpp}
    return out


def packing_check(device: torch.device, dry: bool) -> list[dict]:
    """The engine's start-up packing check (engine/trainer/packing_check.py) on the device, for every attention
    implementation this machine has: a random-init Llama-shaped and a Gemma-3-shaped backbone (sliding windows
    shorter than the check's rows, so they matter), bf16 on CUDA, fp32 on the CPU. One row per (model,
    implementation): the leak (0 or rounding where attention keeps a packed row's examples apart), ok or the
    error. flash_attention_2/3 run only where their packages import (the varlen bounds path)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    from profuser.engine.trainer.packing_check import check_packed_attention

    H, layers = (64, 2) if dry else (2048, 4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = ["sdpa", "eager"]
    if device.type == "cuda" and is_flash_attn_2_available():
        impls.append("flash_attention_2")
    if device.type == "cuda" and is_flash_attn_3_available():
        impls.append("flash_attention_3")
    models = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=H, intermediate_size=2 * H,
                                                      num_hidden_layers=layers, num_attention_heads=H // 64,
                                                      num_key_value_heads=max(H // 256, 1))),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=32000, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=layers,
            num_attention_heads=H // 64, num_key_value_heads=max(H // 256, 1), head_dim=64, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2))),
    }
    rows = []
    for name, make in models.items():
        torch.manual_seed(0)
        lm = make().to(device=device, dtype=dtype)
        for impl in impls:
            row = {"model": name, "attn_implementation": impl, "dtype": str(dtype).removeprefix("torch.")}
            try:
                lm.set_attn_implementation(impl)
                row.update(leak=check_packed_attention(lm.model, lm.config, device, dtype, name), ok=True)
            except Exception as exc:  # noqa: BLE001 - a row per failure, the suite goes on
                row.update(ok=False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            rows.append(row)
        del lm
    return rows
