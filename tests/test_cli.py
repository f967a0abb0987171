"""Argument routing of the `tagger` command line."""

from __future__ import annotations

import pytest

from tagger import cli


@pytest.mark.parametrize(("argv", "module", "expected"), [
    (["model", "train", "--n-aug", "0", "--out", "/tmp/x"], "tagger.modeling.train", ["--n-aug", "0", "--out", "/tmp/x"]),
    (["-v", "eval", "zero-shot", "--data", "d", "--shots", "1,5"], "tagger.evaluation.cli",
     ["zero-shot", "--data", "d", "--shots", "1,5"]),
    (["model", "train"], "tagger.modeling.train", []),
    (["taxonomy", "--help"], "tagger.taxonomy.commands", ["--help"]),
])
def test_commands_with_their_own_parsers_get_their_arguments_in_order(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], module: str, expected: list[str]) -> None:
    import importlib

    received: list[list[str]] = []
    monkeypatch.setattr(importlib.import_module(module), "main", lambda rest: received.append(list(rest)) or 0)
    assert cli.main(argv) == 0
    assert received == [expected]


def test_unknown_options_of_ordinary_commands_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["status", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
