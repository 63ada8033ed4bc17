"""The passes that build the stores: prepare, teach (training mode), generate + score (inference mode)."""
