"""Lowering backends and device profiles, one module each; they register with `evc.registry`."""
