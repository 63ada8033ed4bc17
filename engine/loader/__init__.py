"""The streaming loader: prepared set + teacher stores -> aligned, weighted, padded fusion batches."""
