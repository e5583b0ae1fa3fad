import io

from rich.console import Console

from evc.progress import Progress


def test_stages_show_on_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=80)
    with Progress(console).stage("lower to onnx"):
        pass
    assert "✓ lower to onnx" in console.file.getvalue()


def test_stages_are_silent_when_not_on_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=False)
    with Progress(console).stage("lower to onnx"):
        pass
    assert console.file.getvalue() == ""


def test_a_warning_is_said_once(capsys):
    progress = Progress(Console(file=io.StringIO()))
    progress.warn("random weights")
    progress.warn("random weights")
    assert capsys.readouterr().err == "warning: random weights\n"
