"""The .evc spec language: grammar, syntax tree, parser."""

from evc.spec.parse import LANGUAGE_VERSIONS, parse_spec

__all__ = ["LANGUAGE_VERSIONS", "parse_spec"]
