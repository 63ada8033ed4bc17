"""User tools on top of the pipeline: the end-to-end demo and the training-curve plot."""
