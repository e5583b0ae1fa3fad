"""evc: a declarative model-compression compiler for vision transformers."""

__version__ = "0.1.0"
