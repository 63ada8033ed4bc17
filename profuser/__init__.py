"""ProFuser: progressive fusion of several source LLMs into one target LLM.

Import packages:
  profuser.kernels  the fusion loss library (reference, chunked torch, Triton)
  profuser.engine   data preparation, teacher passes, the teacher store and loader, training, CLI
  profuser._C       optional C++ extension (alignment hot paths); pure-Python fallbacks exist
"""

__version__ = "0.1.0"
