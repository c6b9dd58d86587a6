"""Each command module registers exactly the command words `replicore.cli.COMMANDS` says, so
that a command can import its own module alone."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import replicore.cli as cli


def registered_words(module_name: str) -> list[str]:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    importlib.import_module(f"replicore.cli.{module_name}").register(subparsers)
    return sorted(subparsers.choices)


def test_every_command_module_is_in_the_table_with_its_words():
    modules = {
        info.name
        for info in pkgutil.iter_modules(cli.__path__)
        if hasattr(importlib.import_module(f"replicore.cli.{info.name}"), "register")
    }
    assert modules == set(cli.COMMANDS)
    for name, words in cli.COMMANDS.items():
        assert registered_words(name) == sorted(words), name


def test_a_command_parses_with_its_own_module_only(capsys):
    assert cli.main(["check-config", "--config", "/nonexistent/replicore.toml"]) == 2
    assert "no such file" in capsys.readouterr().err
