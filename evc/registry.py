"""The plug-in contract: passes, formats and devices, registered under the names a spec uses.

Every plug-in registers the same way: a decorator with its name and declared
parameters, on a class that implements its contract.

    @register_pass("head_prune",
        Param("keep", Ratio(), 1.0, "share of heads to keep", per_layer=True))
    class HeadPrune(Pass):
        '''Remove whole attention heads.'''

        def run(self, program, params, ctx):
            ...
            return program

The first line of the class's docstring is its help in `evc explain` and the
README. What a plug-in can do beyond its contract is declared by the
capabilities it inherits (`Gridded`, `Splitting`, `Runtime`, `Placement`,
`Export`, `RemoteBench`, `RemoteTimed`, `BoardTimed`), never probed; how a
budget searches a pass is its `knob`. A registration that breaks the contract fails at import.

Plug-in modules are imported by `load_plugins()` and must stay light at import
time (no torch at module level): `evc check` reads their declarations and must
stay well under a second. Modules whose names start with `_` are their
helpers, and packages (`evc/targets/payload/`) are files for bundles: neither is
imported as a plug-in.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

from evc.spec.params import Param, check_rules_declared

# ---- contracts ----------------------------------------------------------------------------------


class Pass(ABC):
    """A compression pass: a Program in, a Program out."""

    @abstractmethod
    def run(self, program, params: dict, ctx):
        """The compressed Program; `ctx` is an `evc.context.PassContext`."""


class Gridded(ABC):
    """Capability of a pass: a latency grid (`evc profile`) builds its points with it, every block alike.

    `axis` names what it varies: "heads", "units", or "depth" (blocks kept).
    """

    axis: str

    @abstractmethod
    def at(self, program, share: float):
        """The Program with every block at `share` of the axis (at "depth", the first blocks kept)."""


class Splitting(ABC):
    """Capability of a pass: it splits the model into parts (a decomposed Program); a pass written after it
    runs on every part through `each_part`."""

    @abstractmethod
    def each_part(self, program, plugin, params: dict, ctx, whole):
        """`plugin` run with `params` on every part of `program`; `whole` is the model this pass split."""


class Format(ABC):
    """A lowering: a Program to artifacts, and the parity they must reach."""

    @abstractmethod
    def lower(self, program, target, out_dir: Path, ctx) -> list:
        """Write the artifacts into `out_dir`; `ctx` is an `evc.context.Context`."""

    @abstractmethod
    def check_parity(self, parity, params: dict, artifact) -> str | None:
        """None if `parity` (an `evc.runtime.parity.Parity`) passes for `artifact`, else why not."""


class Runtime(ABC):
    """Capability of a format: its artifacts run on this machine, so they are validated and timed here."""

    @abstractmethod
    def session(self, path: Path, threads: int | None = None) -> Callable:
        """run(x) -> output, for one input batch."""

    def run(self, path: Path, images):
        """The outputs for `images`, one at a time as a device would see them."""
        import numpy as np

        run = self.session(path)
        return np.concatenate([run(x[None]) for x in images])


class Placement(ABC):
    """Capability of a format: it can say where each node of a Program runs on the target's device."""

    @abstractmethod
    def placement(self, program, target) -> dict:
        """The operator check: counts per place and every node kept off the accelerator."""


class Export(ABC):
    """Capability of a format: it writes the model alone, as it lowers it, for timing outside a target."""

    @abstractmethod
    def export(self, program, path: Path) -> None: ...

    @abstractmethod
    def export_module(self, module, args: tuple, path: Path, inputs: tuple[str, ...]) -> None:
        """A plain nn.Module (a decomposed model's fusion) run on `args`, its inputs named `inputs`."""


class Device(ABC):
    """A device profile; its scripts are templates, its facts data. Subclasses may add capabilities."""


class RemoteBench(ABC):
    """Capability of a device: `evc bench --serial` benchmarks a bundle on it from here."""

    @abstractmethod
    def bench(self, bundle: Path, manifest: dict, serial: str, runs: int | None, console) -> list[dict]: ...


class RemoteTimed(ABC):
    """Capability of a device: `evc profile --serial S --binary B` times a latency grid's models on it from here."""

    @abstractmethod
    def connect(self, serial: str, binary: Path):
        """The device, checked before any model is made for it (InputError when it is not there)."""

    @abstractmethod
    def time(self, device, binary: Path, models: dict, params: dict, threads: int) -> dict:
        """Each model's ms on `device`, one after another: {key: ms} for {key: artifact path}."""


class BoardTimed(ABC):
    """Capability of a device evc does not reach: its bundles' scripts, run by a person on a PC and on the board,
    leave logs that evc reads the latency from (`evc profile --results`)."""

    steps: tuple[tuple[str, str], ...] = (("board", "bench.sh"),)  # (where, script) run in each bundle, in order

    @abstractmethod
    def latency_ms(self, bundle: Path, threads: int) -> float:
        """The latency the bench script logged in `bundle`; InputError naming the log when it is missing."""


# ---- registries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """A registered plug-in: its name in specs, its declared parameters, the instance, its help line."""

    name: str
    params: tuple[Param, ...]
    plugin: object
    help: str = ""


@dataclass(frozen=True)
class PassInfo(Info):
    check: Callable | None = None  # (params: dict, spans: dict) -> None, raises Invalid
    excludes: dict[str, str] = field(default_factory=dict)  # pass name -> why the two cannot share a compress block
    knob: object | None = None  # an evc.passes.knob.Knob: what a budget chooses in this pass; None: not searched

    @property
    def grid(self) -> str | None:
        """The axis a latency grid varies with this pass (Gridded), or None."""
        return self.plugin.axis if isinstance(self.plugin, Gridded) else None

    @property
    def splits(self) -> bool:
        """Whether the pass splits the model into parts (Splitting)."""
        return isinstance(self.plugin, Splitting)

    def searched(self, params: dict) -> bool:
        """Whether a budget chooses this pass's per-block values: it has a knob and the spec fixed none of them."""
        return self.knob is not None and all(params.get(k) is None for k in self.knob.keys)


@dataclass(frozen=True)
class FormatInfo(Info):
    check: Callable | None = None  # (params: dict, spans: dict, device: str) -> None, raises Invalid


@dataclass(frozen=True)
class DeviceInfo(Info):
    formats: tuple[str, ...] = ()
    templates: str = ""  # a folder under evc/targets/templates
    facts: dict = field(default_factory=dict)  # data the formats read: the device's operator table
    files: tuple[str, ...] = ()  # files of evc/targets/payload/ copied verbatim into the bundle


PASSES: dict[str, PassInfo] = {}
FORMATS: dict[str, FormatInfo] = {}
DEVICES: dict[str, DeviceInfo] = {}


def _register(registry: dict, info_type: type, contract: type, name: str, params: tuple[Param, ...], **declared):
    """The one registration: check `cls` against its contract and its declarations, then record it."""

    def decorate(cls: type) -> type:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not (inspect.isclass(cls) and issubclass(cls, contract)):
            raise TypeError(f"{where}: registered as a {contract.__name__.lower()} but is not a {contract.__name__}")
        if name in registry:
            raise TypeError(f"{where}: a {contract.__name__.lower()} named '{name}' is already registered")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{where}: a parameter is declared twice in {names}")
        check_rules_declared(params, where)
        doc = (cls.__doc__ or "").strip()
        registry[name] = info_type(name, tuple(params), cls(), doc.splitlines()[0] if doc else "", **declared)
        return cls

    return decorate


def register_pass(name: str, *params: Param, check: Callable | None = None, excludes: dict[str, str] | None = None,
                  knob=None):
    """`excludes` names the passes this one cannot share a compress block with, each with the reason:
    `excludes={"token_merge": "both change the token count"}`. It holds both ways round. `knob` (an
    evc.passes.knob.Knob) says how a budget searches the pass: its keys, its groups and widths.
    """
    return _register(PASSES, PassInfo, Pass, name, params, check=check, excludes=dict(excludes or {}), knob=knob)


def register_format(name: str, *params: Param, check: Callable | None = None):
    return _register(FORMATS, FormatInfo, Format, name, params, check=check)


def register_device(name: str, *params: Param, formats: tuple[str, ...], templates: str, facts: dict | None = None,
                    files: tuple[str, ...] = ()):
    return _register(DEVICES, DeviceInfo, Device, name, params, formats=formats, templates=templates,
                     facts=facts or {}, files=files)


def exclusion(a: str, b: str) -> str | None:
    """Why passes `a` and `b` cannot share a compress block, as either of them declares it; None if they can."""
    for one, other in ((a, b), (b, a)):
        info = PASSES.get(one)
        if info is not None and other in info.excludes:
            return info.excludes[other]
    return None


_STAGES = {"budget", "compress", "tokens", "train", "lower", "artifact", "grid", "knob"}  # stage modules beside the plug-ins


@cache
def load_plugins() -> None:
    """Import every plug-in module of evc.passes and evc.targets so they register."""
    for package_name in ("evc.passes", "evc.targets"):
        package = importlib.import_module(package_name)
        # Sorted: the registries' order (README tables, `evc explain`) must not depend on the file system's.
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not module.ispkg and not module.name.startswith("_") and module.name not in _STAGES:
                importlib.import_module(f"{package_name}.{module.name}")
