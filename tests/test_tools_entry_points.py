"""Every command-line tool reaches the user through the one error-to-message path (cli.run),
checked mechanically for each tools/*.py: its ``__main__`` block exits with ``main()``, and
``main`` hands its work to ``cli.run``."""

import ast
import importlib.util
from pathlib import Path

import pytest

from megatron_exact import cli

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


def _main_call_keywords(tree: ast.Module):
    """The constant keyword arguments of the ``main(...)`` call in the ``__main__`` block (None: no such call)."""
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and getattr(node.test.left, "id", None) == "__name__"):
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
            if len(calls) == 1 and not calls[0].args:
                return {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}
    return None


def test_every_tool_is_checked():
    assert {path.name for path in TOOLS} >= {"preprocess_data.py", "effective_context_stats.py",
                                             "convert_checkpoint.py", "pretrain_exact.py"}


@pytest.mark.parametrize("tool", TOOLS, ids=[path.name for path in TOOLS])
def test_tool_entry_point_goes_through_cli_run(tool, monkeypatch):
    tree = ast.parse(tool.read_text())
    keywords = _main_call_keywords(tree)
    assert keywords is not None, f"{tool.name}: the __main__ block must be sys.exit(main(...))"
    spec = importlib.util.spec_from_file_location(f"tool_{tool.stem}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing a tool runs nothing (the __main__ block does)

    calls = []

    def recording_run(prog, main, argv=None):
        calls.append((prog, main, argv))
        return 7

    monkeypatch.setattr(cli, "run", recording_run)
    assert module.main(["--some-flag"], **keywords) == 7
    assert len(calls) == 1, f"{tool.name}: main() must return cli.run(...)"
    prog, inner, argv = calls[0]
    assert prog == tool.name and argv == ["--some-flag"] and callable(inner)
