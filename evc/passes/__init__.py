"""Compression passes, one module each; every module registers itself with `evc.registry.register_pass`."""
