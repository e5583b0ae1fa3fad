"""Where passes, formats and devices register themselves under the names a spec uses.

A pass module in `passes/` (installed as `evc.passes`) registers like this:

    @register_pass("head_prune",
        Param("keep", Ratio(), 1.0, "share of heads to keep", per_layer=True))
    def head_prune(program, params, ctx):
        '''Remove whole attention heads.'''
        ...
        return program

Plug-in modules are imported by `load_plugins()` and must stay light at import
time (no torch at module level): `evc check` reads their declarations and must
stay well under a second.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

from evc.params import Param


@dataclass(frozen=True)
class PassInfo:
    name: str
    params: tuple[Param, ...]
    run: Callable  # (Program, params: dict, PassContext) -> Program
    check: Callable | None = None  # (params: dict, spans: dict) -> None, raises Invalid
    help: str = ""
    excludes: dict[str, str] = field(default_factory=dict)  # pass name -> why the two cannot share a compress block


@dataclass(frozen=True)
class FormatInfo:
    """A lowering backend: turns a Program into artifacts and, where a runtime exists here, runs them."""

    name: str
    params: tuple[Param, ...]
    # An object with lower(program, target, out_dir, ctx) -> [Artifact],
    # check_parity(parity, params, artifact) -> reason or None, and, where the
    # format has a runtime on this machine, session(path, threads) -> run(x).
    backend: Any
    help: str = ""
    check: Callable | None = None  # (params: dict, spans: dict) -> None, raises Invalid


@dataclass(frozen=True)
class DeviceInfo:
    """A device profile: the formats it runs, its keys, its facts, its script templates."""

    name: str
    formats: tuple[str, ...]
    params: tuple[Param, ...]
    templates: str  # a folder under targets/templates
    facts: dict = field(default_factory=dict)
    help: str = ""
    bench: Callable | None = None  # (bundle, manifest, serial, runs, console) -> result: benchmark on the device
    files: tuple[str, ...] = ()  # modules of evc.targets copied verbatim into the bundle (stdlib-only parsers)


PASSES: dict[str, PassInfo] = {}
FORMATS: dict[str, FormatInfo] = {}
DEVICES: dict[str, DeviceInfo] = {}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def register_pass(name: str, *params: Param, check: Callable | None = None, excludes: dict[str, str] | None = None):
    """`excludes` names the passes this one cannot share a compress block with, each with the reason:
    `excludes={"token_merge": "both change the token count"}`. It holds both ways round.
    """

    def decorate(run: Callable) -> Callable:
        PASSES[name] = PassInfo(name, tuple(params), run, check, _first_line(run.__doc__), dict(excludes or {}))
        return run

    return decorate


def exclusion(a: str, b: str) -> str | None:
    """Why passes `a` and `b` cannot share a compress block, as either of them declares it; None if they can."""
    for one, other in ((a, b), (b, a)):
        info = PASSES.get(one)
        if info is not None and other in info.excludes:
            return info.excludes[other]
    return None


def register_format(name: str, *params: Param, check: Callable | None = None):
    def decorate(cls):
        FORMATS[name] = FormatInfo(name, tuple(params), cls(), _first_line(cls.__doc__), check)
        return cls

    return decorate


def register_device(name: str, *params: Param, formats: tuple[str, ...], templates: str,
                    facts: dict | None = None, help: str = "", bench: Callable | None = None,
                    files: tuple[str, ...] = ()) -> DeviceInfo:
    DEVICES[name] = DeviceInfo(name, formats, tuple(params), templates, facts or {}, help, bench, files)
    return DEVICES[name]


@cache
def load_plugins() -> None:
    """Import every module of evc.passes and evc.targets so they register."""
    for package_name in ("evc.passes", "evc.targets"):
        package = importlib.import_module(package_name)
        # Sorted: the registries' order (README tables, `evc explain`) must not depend on the file system's.
        for name in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
            if not name.startswith("_"):
                importlib.import_module(f"{package_name}.{name}")
