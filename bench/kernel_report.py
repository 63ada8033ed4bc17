"""Register and spill report of every Triton kernel config, compiled for sm_90a without a GPU.

Each kernel of profuser.kernels (triton_lse.py, triton_grad.py) is compiled ahead of time with its CUDA
tile config (triton_common.CUDA_CONFIGS) for each flag variant the backend launches, and ptxas -v (shipped
with triton) reports registers, shared memory and spills. GEMM kernels must lower to wgmma (Hopper tensor
cores): a kernel that does not is an error. docs/kernels.md quotes the table.

    python bench/kernel_report.py [--dtype bf16|fp16|fp32] [--json bench/results/kernel_report.json]

Run without TRITON_INTERPRET (the interpreter replaces compilation). Exit status 1 if a GEMM kernel did not
lower to wgmma or spills registers with --no-spills.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from profuser.kernels import triton_common as C
from profuser.kernels import triton_grad as G
from profuser.kernels import triton_lse as L
from profuser.kernels import triton_rows as R

INT64_PTRS = {"Sup_ptr", "PIdx_ptr", "Ids_ptr", "SortedIds_ptr", "Rows_ptr", "RunEnd_ptr", "Arg_ptr"}
FLOAT_SCALARS = {"SOFTCAP", "inv_t", "filter_eps"}
INPUT_PTRS = {"H_ptr", "W_ptr", "Bias_ptr", "Z_ptr"}

ALL_OFF = dict(HAS_BIAS=False, HAS_SOFTCAP=False, HAS_TEMP=False, TAIL=False, FILTER=False)
ALL_ON = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_TEMP=True, TAIL=True, FILTER=True)
# (name, kernel, config kind or None, variants: {variant: constexprs}, GEMM kernel?)
JOBS = [
    ("lse_partial", L._lse_partial_kernel, "lse",
     {"plain": dict(ALL_OFF, ARGMAX=False), "stats+T+softcap+bias": dict(ALL_OFF, HAS_BIAS=True, HAS_SOFTCAP=True,
                                                                           HAS_TEMP=True, ARGMAX=True),
      "tail+stats": dict(ALL_OFF, TAIL=True, ARGMAX=True)}, True),
    ("grad_tile (atomic)", G._grad_tile_kernel, "grad",
     {"plain": dict(ALL_OFF, NEED_DH=True, NEED_DW=True, NEED_DB=False, GROUP=8),
      "T+softcap+bias+filter": dict(ALL_ON, TAIL=False, NEED_DH=True, NEED_DW=True, NEED_DB=True, GROUP=8),
      "tail+softcap+bias+filter": dict(ALL_ON, HAS_TEMP=False, NEED_DH=True, NEED_DW=True, NEED_DB=True, GROUP=8)},
     True),
    ("grad_hidden (deterministic)", G._grad_hidden_kernel, "grad_hidden",
     {"plain": dict(ALL_OFF), "T+softcap+bias+filter": dict(ALL_ON, TAIL=False),
      "tail+softcap+bias+filter": dict(ALL_ON, HAS_TEMP=False)}, True),
    ("grad_weight (deterministic)", G._grad_weight_kernel, "grad_weight",
     {"plain": dict(ALL_OFF, NEED_DW=True, NEED_DB=False),
      "T+softcap+bias+filter": dict(ALL_ON, TAIL=False, NEED_DW=True, NEED_DB=True),
      "tail+softcap+bias+filter": dict(ALL_ON, HAS_TEMP=False, NEED_DW=True, NEED_DB=True)}, True),
    ("indexed_logits", L._indexed_logits_kernel, None,
     {"softcap+bias": dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_S=32, BLOCK_H=64)}, False),
    ("sparse_dh", G._sparse_dh_kernel, None, {"": dict(BLOCK_S=16, BLOCK_H=128)}, False),
    ("sparse_dw", G._sparse_dw_kernel, None, {"": dict(NEED_DW=True, NEED_DB=True, BLOCK_H=128)}, False),
    ("rows_lse (chunked, CUDA)", R._rows_lse_kernel, None,
     {"plain": dict(HAS_SOFTCAP=False, HAS_TEMP=False, TAIL=False, ARGMAX=False, BLOCK=1024, num_warps=8),
      "all flags": dict(HAS_SOFTCAP=True, HAS_TEMP=True, TAIL=True, ARGMAX=True, BLOCK=1024, num_warps=8)}, False),
    ("rows_dz (chunked, CUDA)", R._rows_dz_kernel, None,
     {"plain": dict(HAS_SOFTCAP=False, HAS_TEMP=False, TAIL=False, BLOCK=1024, num_warps=8),
      "all flags": dict(HAS_SOFTCAP=True, HAS_TEMP=True, TAIL=True, BLOCK=1024, num_warps=8)}, False),
]
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def jit_fn(k):
    while not isinstance(k, triton.runtime.jit.JITFunction):
        k = k.fn
    return k


def signature(fn, consts: dict, dt: str) -> tuple[dict, dict]:
    sig, consts = {}, {k: v for k, v in consts.items() if k in fn.arg_names}
    flags = {"Bias_ptr": "HAS_BIAS", "Sup_ptr": "TAIL", "PLT_ptr": "HAS_TEMP", "PLO_ptr": "TAIL",
             "PBest_ptr": "ARGMAX", "PIdx_ptr": "ARGMAX", "Arg_ptr": "ARGMAX", "LSET_ptr": "HAS_TEMP",
             "LSEO_ptr": "TAIL", "Beta_ptr": "HAS_TEMP", "Gamma_ptr": "TAIL", "SOFTCAP": "HAS_SOFTCAP"}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            flag = flags.get(name)
            if flag is not None and name in ("Bias_ptr", "Sup_ptr", "PLT_ptr", "PLO_ptr", "PBest_ptr", "PIdx_ptr",
                                             "Arg_ptr") and not consts.get(flag, True):
                sig[name], consts[name] = "constexpr", None  # launched as None: a constexpr
            else:
                sig[name] = "*" + (dt if name in INPUT_PTRS else "i64" if name in INT64_PTRS else "fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig, consts


def ptxas_report(ptx: str) -> dict:
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))
    if not ptxas:
        return {"error": "ptxas not found in the triton wheel"}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([ptxas[0], "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    text = r.stderr
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "smem_bytes": grab(r"(\d+) bytes smem"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads"),
            "stack_bytes": grab(r"(\d+) bytes stack frame")}


def compile_one(kernel, consts: dict, kind: str | None, dt: str) -> dict:
    fn = jit_fn(kernel)
    opts = {}
    if kind is not None:
        cfg = (C.CUDA_CONFIGS_TAIL if consts.get("TAIL") else C.CUDA_CONFIGS)[kind]
        consts = dict(consts, UPCAST=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                      BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        consts = dict(consts)
        opts = dict(num_warps=consts.pop("num_warps", 4))
    sig, consts = signature(fn, consts, dt)
    out = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = out.asm["ptx"]
    rep = ptxas_report(ptx)
    rep["smem_bytes"] = out.metadata.shared  # dynamic shared memory (ptxas reports static only)
    rep["wgmma"] = "wgmma" in ptx
    rep["config"] = None if kind is None else f"{consts['BLOCK_N']}x{consts['BLOCK_V']}x{consts['BLOCK_H']}, " \
                                              f"{opts['num_warps']} warps, {opts['num_stages']} stages"
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-spills", action="store_true", help="fail when a GEMM kernel spills")
    a = ap.parse_args(argv)
    if C.INTERPRET:
        print("unset TRITON_INTERPRET: the report compiles for sm_90a", file=sys.stderr)
        return 2
    rows, bad = [], []
    for name, kernel, kind, variants, gemm in JOBS:
        for variant, consts in variants.items():
            rep = compile_one(kernel, consts, kind, DTYPES[a.dtype])
            rows.append({"kernel": name, "variant": variant, "dtype": a.dtype, **rep})
            if gemm and a.dtype != "fp32" and not rep["wgmma"]:
                bad.append(f"{name} [{variant}]: no wgmma")
            if gemm and a.no_spills and (rep.get("spill_stores") or 0) > 0:
                bad.append(f"{name} [{variant}]: spills {rep['spill_stores']} bytes")
            print(f"{name:28s} {variant:22s} ok regs={rep.get('registers')} smem={rep.get('smem_bytes')} "
                  f"spill_st={rep.get('spill_stores')} spill_ld={rep.get('spill_loads')} wgmma={rep['wgmma']}",
                  flush=True)
    print("\n| kernel | variant | tile config | registers | smem (B) | spill stores / loads (B) | wgmma |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['variant']} | {r['config'] or '-'} | {r.get('registers')} | {r.get('smem_bytes')} "
              f"| {r.get('spill_stores')} / {r.get('spill_loads')} | {'yes' if r['wgmma'] else 'no'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"target": "sm_90a", "triton": triton.__version__, "rows": rows}, f, indent=1)
    for b in bad:
        print("ERROR", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
