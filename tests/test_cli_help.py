"""`flm COMMAND --help` shows each command's description and options whole. Typer renders help text as rich
markup, where a bracketed word such as the `[demo]` of `pip install 'flm[demo]'` is a style tag
and vanishes unless escaped (`\\[demo]`)."""

from __future__ import annotations

import re

import typer

from flm.cli import app, main

BRACKETED = re.compile(r"(?<!\\)\[[^\]\s]+\]|\\\[[^\]\s]+\]")  # [word] or \[word]


def commands(group, prefix=()):
    """(argv to reach it, command) for every command of a Typer group, sub-commands included."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def help_text(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per paragraph, nothing wrapped away
    main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_every_bracketed_word_of_a_description_reaches_help(capsys, monkeypatch):
    checked = []
    for argv, cmd in commands(typer.main.get_command(app)):
        doc = " ".join([cmd.callback.__doc__ or "", *(getattr(p, "help", None) or "" for p in cmd.params)])
        words = [w.replace("\\[", "[") for w in BRACKETED.findall(doc)]
        if words:
            shown = help_text(argv, capsys, monkeypatch)
            missing = [w for w in words if w not in shown]
            assert not missing, f"flm {' '.join(argv)} --help drops {missing} (escape as \\[...])"
            checked += words
    assert {"[demo]", "[@WEIGHT]"} <= set(checked)  # sample-photos' install hint, train's --data: both seen


def test_negative_control_an_unescaped_bracket_vanishes(capsys, monkeypatch):
    probe = typer.Typer()

    @probe.command()
    def hint():
        """Needs the demo extra: pip install 'flm[demo]'."""

    @probe.command()
    def other():
        """Another command, so the probe is a group."""

    monkeypatch.setattr("flm.cli.app", probe)
    shown = help_text(["hint"], capsys, monkeypatch)
    assert "pip install 'flm'" in shown and "[demo]" not in shown


def test_no_help_shows_a_doubled_percent_sign(capsys, monkeypatch):
    """Help is not %-formatted, so '%%' written for argparse would show as it is."""
    shown = {argv: help_text(argv, capsys, monkeypatch) for argv, _ in commands(typer.main.get_command(app))}
    assert len(shown) >= 10 and all("Usage" in text for text in shown.values())
    assert not [argv for argv, text in shown.items() if "%%" in text]


def test_help_says_what_each_option_takes(capsys, monkeypatch):
    """A flag takes no value and a repeatable option one value per use: help shows neither typer's `<bool>`
    nor its `<list[str]>` for them (both are in typer's own rendering of the same command, the control)."""
    shown = help_text(["train"], capsys, monkeypatch)
    assert "--gate With --heads" in shown and "--data -d <str> FORMAT:PATH" in shown
    assert "<bool>" not in shown and "<list[" not in shown
    typer.main.get_command(app)(["train", "--help"], standalone_mode=False, prog_name="flm")
    raw = " ".join(capsys.readouterr().out.split())
    assert "--gate <bool>" in raw and "--data -d <list[str]>" in raw
