"""Build and install the `profuser` distribution.

Import packages come from top-level folders of the repository:
  profuser/ -> profuser          (version; the optional _C extension lands here)
  kernels/  -> profuser.kernels  (never installed as a top-level `kernels`: that name belongs to another library)
  engine/   -> profuser.engine   (never installed as a top-level `engine`), with its subpackages
  data/     -> profuser.data     (the shipped corpus), configs/ -> profuser.configs (the shipped YAML)

Dependencies: the core install is what the loss library needs (torch, numpy; triton on Linux), as ranges
real users have; the pipeline is the `engine` extra, training adds `train`. Exact pins for this project's
CI machine live in requirements.txt only.

The C++ extension profuser._C (csrc/) needs pybind11 and a C++17 compiler; ninja, when present, compiles
the sources in parallel and incrementally. torch is NOT needed to build it (the extension does not use
torch), so an isolated `pip install .` never pulls a torch build into the build environment. Without a
compiler, or with PROFUSER_NO_BUILD_EXT=1, the build prints one line and the pure-Python fallbacks in
profuser.engine.text.align are used (identical results, slower).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _packages():
    pkgs = {"profuser": "profuser", "profuser.data": "data", "profuser.configs": "configs"}
    for top, name in (("kernels", "profuser.kernels"), ("engine", "profuser.engine")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                sub = name if rel == "." else name + "." + rel.replace(os.sep, ".")
                pkgs[sub] = os.path.relpath(dirpath, ROOT)
    return pkgs


def _ninja() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


class OptionalBuildExt(build_ext):
    """Compile profuser._C (with ninja when available), or fall back to pure Python with a one-line notice."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure means "use the fallback"
            print(f"profuser: C++ extension build failed ({type(exc).__name__}: {exc}); "
                  "using the pure-Python fallback", file=sys.stderr)

    def build_extension(self, ext):
        try:
            ninja = _ninja()
            if ninja and self.compiler.compiler_type == "unix":
                self._ninja_build(ext, ninja)
            else:
                super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"profuser: C++ extension build failed ({type(exc).__name__}: {exc}); "
                  "using the pure-Python fallback", file=sys.stderr)

    def _ninja_build(self, ext, ninja: str) -> None:
        """One compile edge per source (parallel, incremental with depfiles) and one link edge."""
        cc = self.compiler
        cxx = cc.compiler_cxx[0] if cc.compiler_cxx else "c++"
        includes = [f"-I{d}" for d in [*ext.include_dirs, *cc.include_dirs, sysconfig.get_paths()["include"]]]
        macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
        cflags = [*cc.compiler_so[1:], *includes, *macros, *ext.extra_compile_args]
        ldflags = [*cc.linker_so[1:], *ext.extra_link_args, *[f"-L{d}" for d in ext.library_dirs],
                   *[f"-l{lib}" for lib in ext.libraries]]
        build = os.path.abspath(os.path.join(self.build_temp, ext.name))
        os.makedirs(build, exist_ok=True)
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        q = lambda xs: " ".join(shlex.quote(x) for x in xs)  # noqa: E731  (shell words of a command)
        esc = lambda p: p.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731  (ninja paths)
        lines = [f"cxx = {shlex.quote(cxx)}", f"cflags = {q(cflags)}", f"ldflags = {q(ldflags)}",
                 "rule cxx", "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out", "  depfile = $out.d",
                 "  deps = gcc", "rule link", "  command = $cxx $in $ldflags -o $out"]
        objects = []
        for src in ext.sources:
            obj = os.path.join(build, os.path.basename(src) + ".o")
            objects.append(obj)
            lines.append(f"build {esc(obj)}: cxx {esc(os.path.abspath(src))}")
        lines.append(f"build {esc(target)}: link {' '.join(map(esc, objects))}")
        with open(os.path.join(build, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run([ninja, "-C", build], check=True)


def _ext_modules():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("PROFUSER_NO_BUILD_EXT") == "1":
        print("profuser: C++ extension not built (no csrc sources or PROFUSER_NO_BUILD_EXT=1); "
              "using the pure-Python fallback")
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("profuser: pybind11 is not installed: C++ extension not built; using the pure-Python fallback")
        return []
    return [Pybind11Extension("profuser._C", sources, include_dirs=["csrc"], cxx_std=17,
                              extra_compile_args=["-O3", "-fvisibility=hidden"])]


pkgs = _packages()
ENGINE = ["pyarrow>=14", "transformers>=5,<6", "tokenizers>=0.21", "safetensors>=0.4", "pyyaml>=6", "tqdm>=4.60",
          "datasets>=3"]

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
    package_data={"profuser.data": ["*.jsonl", "LICENSE-WordNet.txt"], "profuser.configs": ["*.yaml"]},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
    # the loss library: torch and numpy; triton for the GPU kernels (PyPI's CUDA torch pins its own). Floors
    # tested by `make test-floors` (numpy 1.24.*, triton 3.4.*; .ci/run runs it): triton 3.2 and 3.3 fail the
    # kernels under the interpreter, and torch 2.8 is the first that pins a triton >= 3.4
    install_requires=["torch>=2.8", "numpy>=1.24", "triton>=3.4; platform_system == 'Linux'"],
    extras_require={
        "engine": ENGINE,
        "train": ENGINE + ["deepspeed>=0.16", "accelerate>=1.0", "tensorboard>=2.15", "matplotlib>=3.7", "peft>=0.13",
                           "gguf>=0.10", "sentencepiece>=0.2", "protobuf>=4"],
        "gpu": ["flash-attn"],  # sdist only, needs CUDA: pip install --no-build-isolation profuser[gpu]
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1", "matplotlib>=3.7"],
        "test": ["pytest>=8", "pytest-xdist>=3", "editdistance>=0.8"],
        "trackers": ["wandb>=0.19", "mlflow-skinny>=2.20"],  # log.report_to: [wandb, mlflow]
        "eval": ENGINE + ["lm-eval>=0.4.5"],  # the lm-eval task of `profuser eval --lm-eval` and `profuser study`
        # vLLM pins its own transformers (< 5.20 for 0.32) and torch; ENGINE's transformers>=5,<6 admits both
        "vllm": ENGINE + ["vllm>=0.11"],
    },
    entry_points={"console_scripts": ["profuser=profuser.engine.cli:main"]},
    zip_safe=False,
)
