"""The rollup function's definitions the tool knows (by a fingerprint of their tokens), the
installed one, and the path a run takes because of it (docs/design.md)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection

from usage.db import ROLLUP_FUNCTION_SIGNATURE, rollup_function
from usage.models import BackfillRun
from usage.options import DECLARABLE_MIGRATIONS
from usage.render import short_hash
from usage.repair.rollup.slices import RollupError

TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
COST_COLUMNS = ("cost_usd_ticks",) + tuple(f"uncosted_{name}" for name in TOKEN_COLUMNS)
COUNT_COLUMNS = ("task_count", "event_count")

# The hourly columns each platform version's function writes (besides the key and updated_at).
PLATFORM_COLUMNS = {
    102: TOKEN_COLUMNS + COUNT_COLUMNS,
    213: TOKEN_COLUMNS + COST_COLUMNS + COUNT_COLUMNS,
}
assert tuple(PLATFORM_COLUMNS) == DECLARABLE_MIGRATIONS

# Where a recognised definition comes from, and what it is called.
PLATFORM, FIXTURE, DECLARED = "platform", "fixture", "declared"
DECLARE_SETTING = "CODEX_ROLLUP_DECLARE"
VERSION_NAMES = {
    PLATFORM: "the platform's migration {}",
    FIXTURE: "this project's fixture of migration {}",
    DECLARED: "declared as the platform's migration {} (" + DECLARE_SETTING + ")",
}


@dataclass(frozen=True)
class FunctionVersion:
    """A definition of the rollup function the tool can stand in for."""

    migration: int
    source: str  # PLATFORM, FIXTURE or DECLARED
    fingerprint: str

    @property
    def columns(self) -> tuple[str, ...]:
        return PLATFORM_COLUMNS[self.migration]

    @property
    def name(self) -> str:
        return VERSION_NAMES[self.source].format(self.migration)


# The platform's definitions (multica-ai/multica, server/migrations/102 and 213) and the
# fixture's (sandbox/rollup_window_*.sql); docs/design.md says how to check them.
KNOWN_FUNCTIONS = {
    print_: FunctionVersion(migration, source, print_)
    for migration, source, print_ in (
        (102, PLATFORM, "sha256:6d1db7180295ad57298900e2bfa7066f1516e47fa2fa909fd79c81b3602f3b1e"),
        (213, PLATFORM, "sha256:894f2246ef809a93a20791e3e3f6b8a67fc886e54881bb26555b0d96f02e8ed1"),
        (102, FIXTURE, "sha256:638adb09e7732f938c42933a004cce23bdcab4ca9861252ff04b8ba7ac84d5fd"),
        (213, FIXTURE, "sha256:578f469961c8ec04d8c6bdd459b10b47ef0147cb326c606783054b946a55c1be"),
    )
}

# One SQL token each (whitespace and comments dropped; a comment marker in a string is text).
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line_comment>--[^\n]*)
    | (?P<block_comment>/\*)
    | (?P<string>[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*')
    | (?P<dollar>\$(?P<tag>[^\W\d]\w*|)\$(?:.*?\$(?P=tag)\$|.*))  # to its closing tag, or the end
    | (?P<param>\$\d+)
    | (?P<quoted>"(?:[^"]|"")*")
    | (?P<word>[^\W\d][\w$]*)
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<operator>(?:(?!--|/\*)[-+*/<>=~!@\#%^&|`?])+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT_MARK = re.compile(r"/\*|\*/")


def sql_tokens(text: str) -> list[str]:
    """``text`` as SQL tokens: comments and whitespace dropped, unquoted words in lower case."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        match = _TOKEN.match(text, i)  # never None: "other" matches any character
        kind, i = match.lastgroup, match.end()
        if kind == "block_comment":  # to where it ends: they nest in PostgreSQL
            depth, marks = 1, _COMMENT_MARK.finditer(text, i)
            while depth and (mark := next(marks, None)):
                depth += 1 if mark.group() == "/*" else -1
            i = mark.end() if mark else len(text)
        elif kind == "word":
            tokens.append(match.group().lower())
        elif kind not in ("space", "line_comment"):
            tokens.append(match.group())
    return tokens


def fingerprint(language: str, config: str, body: str) -> str:
    """A definition's fingerprint: its language, its ``SET`` clauses and its body's tokens."""
    text = "\n".join((language, config, " ".join(sql_tokens(body))))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def recognise(print_: str) -> FunctionVersion | None:
    """The version a fingerprint is known or else declared as, or None."""
    declared = settings.CODEX_ROLLUP_DECLARED.get(print_)
    if print_ in KNOWN_FUNCTIONS or declared is None:
        return KNOWN_FUNCTIONS.get(print_)
    return FunctionVersion(declared, DECLARED, print_)


HOURLY_COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = to_regclass(%(table)s) AND attnum > 0 AND NOT attisdropped"""
# What the role lacks to write the hourly table itself, as the own path does.
OWN_PATH_PRIVILEGES_SQL = """
SELECT array(SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) WITH ORDINALITY
             AS w (p, n) WHERE NOT has_table_privilege(%(table)s, p) ORDER BY n)"""


@dataclass(frozen=True)
class InstalledFunction:
    fingerprint: str
    version: FunctionVersion | None
    hourly_columns: frozenset[str]

    @property
    def described(self) -> str:
        return self.version.name if self.version else "unknown"


def installed_fingerprint(cursor: Any) -> str | None:
    """The installed function's fingerprint, or None when it is missing."""
    exists, _returns, _definer, *definition = rollup_function(cursor)
    return fingerprint(*definition) if exists else None


class DefinitionChanged(Exception):
    """The rollup function was redefined since the run chose (and proved) its path."""


def check_definition(cursor: Any, fingerprint: str) -> None:
    now = installed_fingerprint(cursor)
    if now != fingerprint:
        version = recognise(now) if now else None
        named = version.name if version else "unknown"
        what = f"{named}, fingerprint {short_hash(now)}" if now else "gone"
        raise DefinitionChanged(
            f"the rollup function was redefined during the run (now {what}; the run chose "
            f"fingerprint {short_hash(fingerprint)})"
        )


def read_installed_function(cursor: Any) -> InstalledFunction | None:
    """The rollup function as the catalog has it (None when it is missing)."""
    print_ = installed_fingerprint(cursor)
    if print_ is None:
        return None
    return InstalledFunction(print_, recognise(print_), hourly_columns(cursor))


def hourly_columns(cursor: Any) -> frozenset[str]:
    """The hourly table's columns: a known version may write one this database's table lacks."""
    table = f"{settings.CODEX_TARGET_SCHEMA}.task_usage_hourly"
    cursor.execute(HOURLY_COLUMNS_SQL, {"table": table})
    return frozenset(name for (name,) in cursor.fetchall())


@dataclass(frozen=True)
class PathChoice:
    """How a run rebuilds its hourly keys, decided before its first write and recorded."""

    path: str  # a BackfillRun.RollupPath value
    function: str  # the recognised version's name, or "unknown"
    fingerprint: str
    reason: str
    version: FunctionVersion | None = None

    @property
    def own(self) -> bool:
        return self.path == BackfillRun.RollupPath.OWN


# What --rollup-path accepts.
ROLLUP_PATHS = ("auto", "function")


def choose_path(requested: str = "auto", cursor: Any = None) -> PathChoice:
    """The own path for a recognised definition the role can stand in for; else the function."""
    if cursor is None:
        with connection.cursor() as cursor:
            return choose_path(requested, cursor)
    installed = read_installed_function(cursor)
    if installed is None:
        raise RollupError(f"function {ROLLUP_FUNCTION_SIGNATURE} not found")
    version = installed.version
    shown = short_hash(installed.fingerprint)
    found = f"{installed.described} (fingerprint {shown})"
    if version is None:
        why = f": its installed definition (fingerprint {shown}) is not one this tool knows"
    elif requested == "function":
        why = f", as asked (--rollup-path function); installed: {found}"
    elif absent := ", ".join(
        name for name in version.columns if name not in installed.hourly_columns
    ):
        why = f": task_usage_hourly lacks {absent}, which {found} writes"
    else:
        table = f"{settings.CODEX_TARGET_SCHEMA}.task_usage_hourly"
        cursor.execute(OWN_PATH_PRIVILEGES_SQL, {"table": table})
        missing = "/".join(cursor.fetchone()[0])
        why = f": the role may not {missing} task_usage_hourly itself" if missing else ""
    reason = "the platform's function rebuilds the keys" + why
    if not why:
        reason = (
            f"the tool's own aggregate-first recompute (fingerprint {shown}), proven equal to "
            "the function on the run's first keys"
        )
    path = BackfillRun.RollupPath.FUNCTION if why else BackfillRun.RollupPath.OWN
    return PathChoice(path, installed.described, installed.fingerprint, reason, version)
