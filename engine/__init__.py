"""profuser.engine: the fusion pipeline around the loss library.

Layers (imports point down only; tests/engine/test_layers.py checks it):
    cli.py, train.py      the `profuser` command line; the training recipe
    tools/                demo, plot
    passes/ trainer/      teacher passes that build the stores; the training step, schedule, checkpoints, eval
    loader/               the streaming loader: stores + alignment -> padded fusion batches
    store.py              the prepared set and teacher stores on disk
    text/                 chat encoding, token and vocabulary alignment, known tokenizers
    config.py models.py dist.py   typed configs and choice lists; model/tokenizer/dtype/logit rules; ranks
"""
