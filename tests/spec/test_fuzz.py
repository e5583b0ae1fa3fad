"""A seeded mutation fuzzer over every spec in the repository: whatever a user's edit does to a spec, checking
it either passes or is a spec error (exit 2) at its place, never a traceback."""

import random
import re

import pytest

from evc.errors import EvcError
from evc.spec.check import parse_and_check
from tests.conftest import ROOT

SPECS = sorted([*ROOT.glob("specs/*.evc"), *ROOT.glob("examples/**/*.evc"), *ROOT.glob("tests/specs/**/*.evc")])
NUMBER = re.compile(r"(?<![\w.])-?\d+(\.\d*)?([eE][-+]?\d+)?(%|ms|us|K|M|G)?(?![\w.])")
# Values a hand, a paste or a bad disk puts where a number was: overflow, underflow, NaN's names, other scripts'
# digits, fractions of nothing, units on the wrong thing.
ODD_VALUES = ["inf", "-inf", "nan", "NaN", "1e999", "-1e999", "1e-999", "9" * 400, "1" + "0" * 330 + "%",
              "1e999%", "1e999ms", "1e999M", "99999999999999999999999M", "١٢", "٣/٤", "０.５", "½", "1/0", "0/0",
              "9" * 400 + "/3", "3/" + "9" * 400, "0x10", "1_000", "-0", "-0.0", ".5.", "1e", "1e+", "--1", "0.5%%",
              "12 ms", "1/2/3", "2/3%", "\"0.5\"", "true", "[]", "{}", "[0.5, inf]"]
ODD_CHARS = list("{}[]()=,;:\"'\\#%/.-+*&|$`~?!@^<>") + ["\n", "\t", "\x00", "é", "→", "٣", "\u200b", "\\x", "\\u12"]


def mutate(text: str, rng: random.Random) -> str:
    """One edit a person or a fault could make."""
    lines = text.split("\n")
    kind = rng.randrange(6)
    if kind == 0 and NUMBER.search(text):
        numbers = list(NUMBER.finditer(text))
        m = rng.choice(numbers)
        return text[:m.start()] + rng.choice(ODD_VALUES) + text[m.end():]
    if kind == 1 and text:
        i = rng.randrange(len(text))
        return text[:i] + text[i + 1:]
    if kind == 2:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(ODD_CHARS) + text[i:]
    if kind == 3 and len(lines) > 1:
        i = rng.randrange(len(lines))
        lines.insert(rng.randrange(len(lines)), lines[i])
        return "\n".join(lines)
    if kind == 4 and len(lines) > 1:
        del lines[rng.randrange(len(lines))]
        return "\n".join(lines)
    words = list(re.finditer(r"[A-Za-z_]\w*", text))
    if not words:
        return text + rng.choice(ODD_CHARS)
    m = rng.choice(words)
    return text[:m.start()] + rng.choice(["inf", "nan", "true", "keep", "model", "target", "x" * 300, "é"]) + \
        text[m.end():]


def check_survives(spec, seed: int, edits: int) -> None:
    rng = random.Random(f"{spec.name}:{seed}")
    text = spec.read_text()
    for _ in range(edits):
        text = mutate(text, rng)
    try:
        parse_and_check(text, spec)
    except EvcError as e:
        assert e.exit_code == 2, f"exit {e.exit_code} for a spec edit:\n{text}"
        e.render()  # the message itself must render
    except Exception as e:  # noqa: BLE001  what a user must never see
        raise AssertionError(f"{type(e).__name__}: {e}\nfor this edit of {spec.name} (seed {seed}):\n{text}") from e


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_mutated_spec_checks_or_is_a_spec_error(spec, seed):
    check_survives(spec, seed, edits=1 + seed % 3)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_many_mutated_specs_check_or_are_spec_errors(spec):
    for seed in range(100, 160):
        check_survives(spec, seed, edits=1 + seed % 4)


@pytest.mark.parametrize("value", ODD_VALUES)
@pytest.mark.parametrize("key", ["keep", "tolerance", "macs"])
def test_every_odd_value_at_a_key_is_a_spec_error_at_its_place(key, value, tmp_path):
    """Each value a number's place may hold, at a share, a float and an amount: never a traceback."""
    extra = {"keep": "compress {{\n    head_prune {{ keep = {v} }}\n}}\n",
             "macs": "data d {{ synthetic = 2 }}\ncompress {{\n    budget {{ macs = {v}, data = d }}\n"
                     "    head_prune {{ score = l1 }}\n}}\n",
             "tolerance": ""}[key].format(v=value)
    target = (f"target cpu {{ device = cpu, format = onnx, tolerance = {value} }}" if key == "tolerance"
              else "target cpu { device = cpu, format = onnx }")
    text = ("evc 1\nmodel small {\n    source = timm(\"vit_tiny_patch16_224\", img_size = 32, patch_size = 8)\n"
            f"    input = image(32, 32)\n}}\n{extra}{target}\n")
    try:
        parse_and_check(text, tmp_path / "odd.evc")
    except EvcError as e:
        assert e.exit_code == 2
        assert re.search(r"odd\.evc:\d+:\d+: error", e.render()), e.render()
