"""Build and install the `profuser` distribution.

Import packages come from three top-level folders:
  profuser/ -> profuser          (version, the optional _C extension lands here)
  kernels/  -> profuser.kernels  (never installed as a top-level `kernels`: that name belongs to another library)
  engine/   -> profuser.engine   (never installed as a top-level `engine`)

The C++ extension profuser._C (csrc/, pybind11, compiled with ninja through torch's BuildExtension) is
optional: without a compiler, or with PROFUSER_NO_BUILD_EXT=1, the build prints one line and the
pure-Python fallbacks in profuser.engine.align are used (identical results, slower).
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _packages():
    pkgs = {"profuser": "profuser"}
    for top, name in (("kernels", "profuser.kernels"), ("engine", "profuser.engine")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                sub = name if rel == "." else name + "." + rel.replace(os.sep, ".")
                pkgs[sub] = os.path.relpath(dirpath, ROOT)
    return pkgs


def _ext_modules_and_cmd():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("PROFUSER_NO_BUILD_EXT") == "1":
        print("profuser: C++ extension not built (no csrc sources or PROFUSER_NO_BUILD_EXT=1); "
              "using the pure-Python fallback")
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension

    ext = Pybind11Extension(
        "profuser._C",
        sources,
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fvisibility=hidden"],
    )
    try:  # torch's BuildExtension drives ninja (parallel, incremental); plain setuptools otherwise
        from torch.utils.cpp_extension import BuildExtension

        base = BuildExtension.with_options(use_ninja=True, no_python_abi_suffix=False)
    except Exception:  # pragma: no cover - torch is a hard dependency, but stay buildable without it
        base = _setuptools_build_ext

    class OptionalBuildExt(base):
        """Compile profuser._C, or fall back to pure Python with a one-line notice."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "use the fallback"
                print(f"profuser: C++ extension build failed ({type(exc).__name__}: {exc}); "
                      "using the pure-Python fallback", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"profuser: C++ extension build failed ({type(exc).__name__}: {exc}); "
                      "using the pure-Python fallback", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


pkgs = _packages()
ext_modules, cmdclass = _ext_modules_and_cmd()

setup(
    name="profuser",
    version="0.1.0",
    description="Kernel-accelerated progressive fusion of heterogeneous LLMs (ProFuser / FuseLLM / FuseChat)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=sorted(pkgs),
    package_dir=pkgs,
    package_data={"profuser.engine": ["assets/*", "assets/**/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "pyarrow",
        "datasets",
        "transformers>=5,<6",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton==3.7.1"],
        "train": ["deepspeed==0.19.8", "accelerate", "tensorboard", "matplotlib", "gguf", "sentencepiece",
                  "protobuf"],
        "gpu": ["flash-attn"],  # sdist only, needs CUDA: pip install --no-build-isolation profuser[gpu]
        "bench": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "matplotlib"],
        "test": ["pytest", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["profuser=profuser.engine.cli:main"]},
    zip_safe=False,
)
