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
capabilities it inherits (`Gridded`, `Splitting`, `Recovering`, `Runtime`, `Placement`,
`Estimated`, `Export`, `RemoteBench`, `RemoteTimed`, `BoardTimed`), never probed; how a
budget searches a pass is its `knob`. A registration that breaks the contract fails at import.

`evc check` reads the declarations from a generated table (evc/plugins.py)
without importing a plug-in; a plug-in's module is imported when its
instance, check or knob is first used, and must stay light at import time
(no torch at module level). Modules whose names start with `_` are their
helpers, and packages (`evc/targets/payload/`) are files for bundles: neither
registers anything.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import MutableMapping
from pathlib import Path
from typing import Callable

from evc.declarations import REGISTERED, DeviceInfo, FormatInfo, PassInfo, Registered
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


class Recovering(ABC):
    """Capability of a pass: it trains the model it is given back towards the one loaded (finetune). A budget
    judged by recovery gives every candidate allocation a short run of the recipe it returns."""

    @abstractmethod
    def recovery(self, program, params: dict, ctx):
        """The recipe this pass would train `program` with: an evc.passes.train.Run (its teacher, its
        images and its Recipe, the learning rate fitted to `program` where the spec asks for it)."""


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


class Estimated(ABC):
    """Capability of a format: a compiler here estimates its artifact's latency on the device (Vela's cycles at the
    system's clock), so a latency table is built from estimates and a latency budget checked against one."""

    @abstractmethod
    def estimated_ms(self, artifact: Path) -> float:
        """The estimated ms of one inference of `artifact`, a path `lower` returned."""


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
    def binary(self, fmt: str) -> str:
        """The tool that times a model of format `fmt` on the device: what `--binary` defaults to."""

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
#
# Every plug-in of evc.passes and evc.targets is declared in the table evc/plugins.py, generated from their
# registrations (`python -m evc.registry`); tests/test_registry.py checks that it matches them. A registry is
# filled from the table, so reading declarations (evc check, evc explain, the README's tables) imports no
# plug-in; what only a plug-in's module has (its instance, its check, its knob, a device's facts) imports it
# on first use, and its registration is checked against the table then.


class Registry(MutableMapping):
    """Plug-ins of one kind by name: the table's, then any registered at run time (a test's), in that order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._infos: dict | None = None

    @property
    def infos(self) -> dict:
        if self._infos is None:
            from evc import plugins

            self._infos = {info.name: info for info in getattr(plugins, self.kind)}
        return self._infos

    def __getitem__(self, name: str):
        return self.infos[name]

    def __setitem__(self, name: str, info) -> None:
        self.infos[name] = info

    def __delitem__(self, name: str) -> None:
        info = self.infos.pop(name)
        REGISTERED.pop((type(info), name), None)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


PASSES: Registry = Registry("PASSES")
FORMATS: Registry = Registry("FORMATS")
DEVICES: Registry = Registry("DEVICES")
_GENERATING = False  # python -m evc.registry: registrations are the truth, the table is being written


def _register(registry: Registry, info_type: type, contract: type, name: str, params: tuple[Param, ...],
              loaded: dict, **declared):
    """The one registration: check `cls` against its contract and its declarations, then record it."""

    def decorate(cls: type) -> type:
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not (isinstance(cls, type) and issubclass(cls, contract)):
            raise TypeError(f"{where}: registered as a {contract.__name__.lower()} but is not a {contract.__name__}")
        listed = registry.get(name)
        if (info_type, name) in REGISTERED or (listed is not None and listed.module != cls.__module__):
            raise TypeError(f"{where}: a {contract.__name__.lower()} named '{name}' is already registered")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{where}: a parameter is declared twice in {names}")
        check_rules_declared(params, where)
        doc = (cls.__doc__ or "").strip()
        info = info_type(name, tuple(params), cls.__module__, doc.splitlines()[0] if doc else "",
                         has_check=loaded.get("check") is not None, **declared)
        if listed is not None and listed != info and not _GENERATING:
            raise TypeError(f"{where}: its registration differs from evc/plugins.py, the table `evc check` reads; "
                            "write the table again: python -m evc.registry")
        registered = Registered(cls(), **loaded)  # an abstract method left out fails here, before it is recorded
        registry[name] = info
        REGISTERED[(info_type, name)] = registered
        return cls

    return decorate


def register_pass(name: str, *params: Param, check: Callable | None = None, excludes: dict[str, str] | None = None,
                  knob=None):
    """`excludes` names the passes this one cannot share a compress block with, each with the reason:
    `excludes={"token_merge": "both change the token count"}`. It holds both ways round. `knob` (an
    evc.passes.knob.Knob) says how a budget searches the pass: its keys, its groups and widths.
    """
    def decorate(cls: type) -> type:
        return _register(PASSES, PassInfo, Pass, name, params, {"check": check, "knob": knob},
                         excludes=dict(excludes or {}), knob_keys=tuple(knob.keys) if knob else (),
                         knob_timed=bool(knob.timed) if knob else True,
                         grid=cls.axis if isinstance(cls, type) and issubclass(cls, Gridded) else None,
                         splits=isinstance(cls, type) and issubclass(cls, Splitting),
                         recovers=isinstance(cls, type) and issubclass(cls, Recovering))(cls)

    return decorate


def register_format(name: str, *params: Param, check: Callable | None = None):
    return _register(FORMATS, FormatInfo, Format, name, params, {"check": check})


def register_device(name: str, *params: Param, formats: tuple[str, ...], templates: str, facts: dict | None = None,
                    files: tuple[str, ...] = (), format_files: dict[str, tuple[str, ...]] | None = None):
    """`files` are copied from evc/targets/payload/ into every bundle of the device, `format_files` into those
    of one format: `format_files={"tflite": ("parse_benchmark_model.py",)}`."""
    return _register(DEVICES, DeviceInfo, Device, name, params, {"facts": facts or {}}, formats=tuple(formats),
                     templates=templates, files=tuple(files),
                     format_files={k: tuple(v) for k, v in (format_files or {}).items()})


def exclusion(a: str, b: str) -> str | None:
    """Why passes `a` and `b` cannot share a compress block, as either of them declares it; None if they can."""
    for one, other in ((a, b), (b, a)):
        info = PASSES.get(one)
        if info is not None and other in info.excludes:
            return info.excludes[other]
    return None


def load_plugins() -> None:
    """Import every plug-in module the table lists, so that each is registered (and checked against it)."""
    for registry in (PASSES, FORMATS, DEVICES):
        for info in list(registry.values()):
            info.loaded


# ---- the table ---------------------------------------------------------------------------------

PLUGIN_PACKAGES = ("evc.passes", "evc.targets")


def registrations() -> dict[str, list]:
    """Every plug-in registered by the modules of evc.passes and evc.targets, imported one by one (sorted, so
    the order of the README's tables and `evc explain` does not depend on the file system's)."""
    import pkgutil

    global _GENERATING
    _GENERATING = True
    try:
        for registry in (PASSES, FORMATS, DEVICES):
            registry._infos = {}
        for package_name in PLUGIN_PACKAGES:
            package = importlib.import_module(package_name)
            for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
                if not module.ispkg and not module.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{module.name}")
    finally:
        _GENERATING = False
    return {"PASSES": list(PASSES.values()), "FORMATS": list(FORMATS.values()), "DEVICES": list(DEVICES.values())}


def table_source() -> str:
    """evc/plugins.py's text: each registration's declaration as Python."""
    from evc.declarations import source

    return source(registrations())


if __name__ == "__main__":  # the plug-ins register with evc.registry, not with this __main__: ask that one
    from evc import registry
    from evc.atomic import write_text

    write_text(Path(registry.__file__).with_name("plugins.py"), registry.table_source())
