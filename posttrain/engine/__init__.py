"""The DeepSpeed ZeRO backend: engine, distributed set-up, atomic checkpoints, export."""
