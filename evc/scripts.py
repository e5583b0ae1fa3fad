"""Generated scripts: every jinja2 template of a device's folder, rendered into the bundle."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import jinja2


def templates_root() -> Path:
    import evc.targets

    return Path(evc.targets.__file__).parent / "templates"


def _environment(folder: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_root() / folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # `{{ value | sh }}`: every value that reaches a shell script goes through
    # this, so a spec string can never inject shell.
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def render_scripts(folder: str, context: dict, out_dir: Path, files: tuple[str, ...] = ()) -> list[str]:
    """Render each `NAME.j2` to `out_dir/NAME` and copy `files` (modules of evc.targets); scripts are executable."""
    env = _environment(folder)
    written = []
    for name in files:
        path = out_dir / name
        path.write_text((templates_root().parent / name).read_text())
        path.chmod(0o755)
        written.append(name)
    for name in env.list_templates(filter_func=lambda n: n.endswith(".j2")):
        path = out_dir / name.removesuffix(".j2")
        path.write_text(env.get_template(name).render(**context))
        if path.suffix in (".sh", ".py"):
            path.chmod(0o755)
        written.append(path.name)
    return written


def templates_digest(folder: str, files: tuple[str, ...] = ()) -> str:
    digest = hashlib.sha256()
    paths = sorted((templates_root() / folder).glob("*.j2")) + [templates_root().parent / f for f in files]
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
