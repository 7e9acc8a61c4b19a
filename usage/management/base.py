"""The base of the tool's commands: one-line argument errors, and examples in ``--help``.

Argument errors are bad input like any other: one line and exit status 1. Plain argparse
prints its usage and exits 2, and it reads a value that starts with ``-`` (``--sleep-between-
batches -1s``) as an unknown option; here such a value goes to its option, whose own parser
then says what is wrong with it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandError, CommandParser

# An argument error quotes at most this much of a value, and says at most this much.
LONGEST_WORD = 80
LONGEST_MESSAGE = 400


def _shorten(match: re.Match[str]) -> str:
    word = match.group(0)
    return f"{word[:60]}...({len(word) - 60} more characters)"


class ToolParser(CommandParser):
    """Django's parser with the tool's rules for values and errors (see the module)."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            args = self._attach_dash_values(list(args))
        return super().parse_known_args(args, namespace)

    def _attach_dash_values(self, args: list[str]) -> list[str]:
        """``--flag -1s`` becomes ``--flag=-1s`` for a flag that takes one value."""
        known = set(self._option_string_actions)
        takes_value = {
            option
            for action in self._actions
            if action.nargs is None
            for option in action.option_strings
        }
        attached: list[str] = []
        position = 0
        while position < len(args):
            token = args[position]
            if token == "--":
                attached.extend(args[position:])
                break
            following = args[position + 1] if position + 1 < len(args) else None
            if (
                token in takes_value
                and following is not None
                and following.startswith("-")
                and following not in known
            ):
                attached.append(f"{token}={following}")
                position += 2
                continue
            attached.append(token)
            position += 1
        return attached

    def error(self, message: str) -> NoReturn:
        # argparse quotes the offending value whole: keep the line short whatever it was.
        text = re.sub(rf"\S{{{LONGEST_WORD},}}", _shorten, " ".join(message.split()))
        if len(text) > LONGEST_MESSAGE:
            text = text[:LONGEST_MESSAGE] + "..."
        text = f"{text} (see {self.prog.strip()} --help)"
        if self.called_from_command_line:
            self.exit(1, f"CommandError: {text}\n")
        raise CommandError(f"Error: {text}")


class ExamplesCommand(BaseCommand):
    """A command whose help epilog is ``examples()``, laid out verbatim."""

    def examples(self) -> str:
        return ""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # BaseCommand builds a CommandParser itself; ToolParser only adds behaviour to it.
        parser.__class__ = ToolParser
        parser.epilog = self.examples()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser
