"""The base of the tool's commands: ``--help`` ends with worked examples, kept as written."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class ExamplesCommand(BaseCommand):
    """A command whose help epilog is ``examples()``, laid out verbatim."""

    def examples(self) -> str:
        return ""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.epilog = self.examples()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser
