"""Policy / reference / reward models: loading, the tiny default, the log-prob wrapper, LoRA."""
