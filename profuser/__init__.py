"""ProFuser: progressive fusion of several source LLMs into one target LLM.

Import packages:
  profuser.kernels  the fusion loss library (reference, chunked torch, Triton)
  profuser.engine   data preparation, teacher passes, the teacher store and loader, training, CLI
  profuser._C       optional C++ extension (alignment hot paths); pure-Python fallbacks exist

The pipeline as functions (engine/api.py; the same keys as the commands and their YAML):
  profuser.prepare, profuser.teach, profuser.generate, profuser.score, profuser.train
They load on first use, so `import profuser` stays light (the loss library needs torch only).
"""

__version__ = "0.1.0"

_API = ("prepare", "teach", "generate", "score", "train")
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        from profuser.engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'profuser' has no attribute {name!r}")
