"""The streaming loader: prepared set + teacher stores -> aligned, weighted, padded fusion batches.

    from profuser.engine.config import DataConfig
    from profuser.engine.loader import FusionLoader
    loader = FusionLoader(DataConfig(data_dir=..., sources=[...]), tokenizer, student=..., mode="train")

loader.py (FusionLoader), collate.py (student encoding, padding), advantage.py (MinCE / AvgCE weights),
spans.py (chain-rule targets at spanning positions), packing.py (rows of whole examples), stream.py (the
training recipe's endless per-mode streams).
"""

from .loader import DataError, FusionLoader

__all__ = ["DataError", "FusionLoader"]
