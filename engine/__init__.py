"""profuser.engine: the fusion pipeline around the loss library.

Layers (imports point down only; tests/engine/test_layers.py checks it):
    cli.py, train.py      the `profuser` command line; the training recipe
    tools/                demo, study, check, repoint, plot, config show, synthetic stores
    passes/ trainer/      teacher passes that build the stores; the training step, schedule, checkpoints, eval
    loader/               the streaming loader: stores + alignment -> padded fusion batches
    store/                the prepared set and teacher stores on disk
    text/                 chat encoding, token and vocabulary alignment, known tokenizers
    models/ config_cli.py model / tokenizer / dtype / logit rules; every command's options from its dataclass
    commands.py config.py dist.py errors.py fileio.py   the subcommand table; typed configs and choice lists;
                          ranks; one-line errors; atomic writes, full-disk errors and the one lock
"""
