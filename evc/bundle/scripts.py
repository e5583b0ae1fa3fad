"""Generated scripts: every jinja2 template of a device's folder, rendered into the bundle."""

from __future__ import annotations

import shlex
from pathlib import Path

import jinja2


def templates_root() -> Path:
    import evc.targets

    return Path(evc.targets.__file__).parent / "templates"


SHARED = "_shared"


def _environment(folder: str) -> jinja2.Environment:
    env = jinja2.Environment(
        # the device's own templates, and what they include from _shared/ (not rendered on their own)
        loader=jinja2.FileSystemLoader([templates_root() / folder, templates_root() / SHARED]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # `{{ value | sh }}`: every value that reaches a shell script goes through
    # this, so a spec string can never inject shell.
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def render_scripts(device, context: dict, out_dir: Path) -> list[str]:
    """Render each `NAME.j2` of the device's templates to `out_dir/NAME` and copy the payload files of the
    target's format; scripts are executable."""
    env = _environment(device.templates)
    written = []
    for name in device.files_for(context["target"].format):
        path = out_dir / name
        path.write_text((payload_root() / name).read_text())
        path.chmod(0o755)
        written.append(name)
    for name in env.list_templates(filter_func=lambda n: n.endswith(".j2")):
        path = out_dir / name.removesuffix(".j2")
        path.write_text(env.get_template(name).render(**context))
        if path.suffix in (".sh", ".py"):
            path.chmod(0o755)
        written.append(path.name)
    return written


def render_one(templates: str, name: str, path: Path, **context) -> None:
    """One template of the `templates` folder rendered to `path`, executable."""
    from evc import __version__

    path.write_text(_environment(templates).get_template(name).render(evc_version=__version__, **context))
    path.chmod(0o755)


def bundle_files(device) -> list[Path]:
    """Every file a device's bundles are made from: its templates, what they include, and its payload files."""
    templates = [*(templates_root() / device.templates).iterdir(), *(templates_root() / SHARED).iterdir()]
    payload = dict.fromkeys(device.files + sum(device.format_files.values(), ()))
    return sorted(templates) + [payload_root() / f for f in payload]


def payload_root() -> Path:
    return templates_root().parent / "payload"
