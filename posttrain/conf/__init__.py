"""posttrain's Hydra configs (YAML only; this file makes them a package Hydra finds as `pkg://posttrain.conf`).

Groups live in `<group>/<option>.yaml`, the primary config in `config.yaml`. They ship inside the package so an
installed wheel works anywhere; the checkout's top-level `conf/` is a link to this directory.
"""
