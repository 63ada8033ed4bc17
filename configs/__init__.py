"""profuser.configs: the shipped experiment YAML files (demo.yaml is `profuser demo`'s default)."""
