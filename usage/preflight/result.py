"""What a pre-flight check is given (``Context``) and reports (``passed``, ``warned``,
``failed``)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from usage.repair.rollup import choose_path
from usage.repair.rollup.versions import PathChoice


@dataclass(frozen=True)
class CheckResult:
    """One line of the checklist: what was found and, unless fine, what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False
    skipped: bool = False
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """``ok``, ``warn`` (passes, but read the fix), ``fail``, or ``skip`` (not checked)."""
        if self.skipped:
            return "skip"
        if not self.ok:
            return "fail"
        return "warn" if self.warning else "ok"


@dataclass(frozen=True)
class Context:
    """What every check may use: a cursor inside the read-only transaction and the options."""

    cursor: Any
    cutoff: datetime
    workspace_id: uuid.UUID | None
    target_schema: str
    tool_schema: str

    def one(self, query: str, params: Any = None) -> Any:
        self.cursor.execute(query, params)
        return self.cursor.fetchone()

    def all(self, query: str, params: Any = None) -> list[Any]:
        self.cursor.execute(query, params)
        return self.cursor.fetchall()

    def column(self, query: str, params: Any = None) -> list[Any]:
        return [row[0] for row in self.all(query, params)]

    @cached_property
    def path(self) -> PathChoice:
        """The rollup's path and the definition it recognised, read once for the checks."""
        return choose_path(cursor=self.cursor)


@dataclass(frozen=True)
class Check:
    """A named check; ``requires`` names checks that must pass before this one can run."""

    name: str
    title: str
    run: Callable[[Context], CheckResult]
    requires: tuple[str, ...] = ()


def passed(detail: str) -> CheckResult:
    return CheckResult("", True, detail)


def failed(detail: str, fix: str) -> CheckResult:
    return CheckResult("", False, detail, fix)


def warned(detail: str, fix: str) -> CheckResult:
    return CheckResult("", True, detail, fix, warning=True)
