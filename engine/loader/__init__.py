"""The streaming loader: prepared set + teacher stores -> aligned, weighted, padded fusion batches.

    from profuser.engine.loader import FusionDataConfig, FusionLoader

loader.py (FusionLoader), collate.py (student encoding, padding), advantage.py (MinCE / AvgCE weights),
stream.py (the training recipe's endless per-mode streams).
"""

from .loader import DataError, FusionDataConfig, FusionLoader

__all__ = ["DataError", "FusionDataConfig", "FusionLoader"]
