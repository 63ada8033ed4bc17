"""Text and tokens: chat encoding with character spans, token and vocabulary alignment, known tokenizers."""
