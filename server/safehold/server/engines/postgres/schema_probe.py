"""The upload's schema version, read inside the restore's transaction before COMMIT.

Only that transaction sees the replayed database, so the version queries run in
the same psql session, after the replay: in a DO block, each query in its own
subtransaction (a missing table is an answer, not an error that would abort
the restore), read-only, with the application's search path. What they return
travels out in a transaction-local setting with a random name, which the end
marker prints hex-encoded (session.py), so that nothing the upload prints can
pass for it.

The replayed content is the upload's, and the upload set the session up as it
liked (pg_dump's `search_path = ''`, or its own functions and operators): the
probe's own expressions run with `search_path = pg_catalog` and call only
schema-qualified catalog functions; only the configured queries run with the
application's search path, where they must find the application's tables, and
pg_temp comes last there so a temporary table cannot stand in for one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from safehold.server import schema_version
from safehold.server.schema_version import SchemaVersion, VersionQuery

_RESULT_CHARS = 1000
"""What one query may return (two rows at most, as JSON); longer is cut and unknown."""
_ERROR_CHARS = 200


class _QueryFailed(Exception):
    """A query failed inside the transaction; its message is PostgreSQL's."""


class SchemaProbe:
    """SQL to append after the replay, and how to read what it printed."""

    def __init__(self, candidates: Sequence[VersionQuery]) -> None:
        self._candidates = candidates
        self.setting = f"safehold.schema_{secrets.token_hex(8)}"

    def sql(self) -> str:
        """Statements that leave the candidates' outcomes, one JSON object a line,
        in the setting named self.setting; the first one that runs ends the list."""
        steps = "\n".join(self._step(query) for query in self._candidates)
        outer = f"$probe_{secrets.token_hex(8)}$"
        # Built from safehold's own text, random names and the operator's configured
        # queries, each dollar-quoted with a random tag: nothing from the upload.
        return (
            "SET LOCAL statement_timeout = 0;\n"  # noqa: S608
            "SET LOCAL search_path = pg_catalog;\n"
            f"DO {outer}\n"
            "DECLARE\n"
            "    app_path text;\n    found text;\n    failure text;\n    outcome text := '';\n"
            "    done boolean := false;\n"
            "BEGIN\n"
            "    SELECT pg_catalog.concat(reset_val, ', pg_temp') INTO app_path\n"
            "        FROM pg_catalog.pg_settings WHERE name = 'search_path';\n"
            f"{steps}\n"
            f"    PERFORM pg_catalog.set_config('{self.setting}', outcome, true);\n"
            f"END\n{outer};\n"
        )

    def value(self) -> str:
        """The SQL expression the end marker prints."""
        return f"pg_catalog.current_setting('{self.setting}', true)"

    def read(self, printed: str | None) -> SchemaVersion:
        """The version from what the end marker printed (None: nothing came)."""
        try:
            outcomes = [json.loads(line) for line in (printed or "").splitlines() if line]
        except ValueError:
            outcomes = []
        if not outcomes:
            return SchemaVersion(None, "the restore did not report it")
        replay = iter(outcomes)

        def run(_sql: str) -> list[tuple[Any, ...]]:
            outcome = next(replay, {"error": "not run"})
            if "error" in outcome:
                raise _QueryFailed(str(outcome["error"]))
            rows = json.loads(outcome["rows"], object_pairs_hook=lambda pairs: pairs)
            return [tuple(value for _, value in row) for row in rows]

        try:
            return schema_version.read(run, self._candidates, _QueryFailed)
        except (ValueError, TypeError, KeyError):
            return SchemaVersion(None, "the restore reported something that is no version")

    @staticmethod
    def _step(query: VersionQuery) -> str:
        """One candidate in a subtransaction that is always rolled back (SH000),
        taking the read-only switch and the search path with it."""
        text = query.sql.strip().rstrip(";")
        wrapped = (  # the operator's configured query, see sql()
            "SELECT pg_catalog.left(COALESCE(pg_catalog.json_agg(safehold_rows)::text, '[]'), "  # noqa: S608
            f"{_RESULT_CHARS}) FROM (SELECT * FROM ({text}) AS safehold_query LIMIT 2) "
            "AS safehold_rows"
        )
        quote = f"$query_{secrets.token_hex(8)}$"
        return f"""\
    IF NOT done THEN
        found := NULL;
        failure := NULL;
        BEGIN
            PERFORM pg_catalog.set_config('transaction_read_only', 'on', true);
            PERFORM pg_catalog.set_config('search_path', app_path, true);
            EXECUTE {quote}{wrapped}{quote} INTO found;
            RAISE SQLSTATE 'SH000';
        EXCEPTION
            WHEN SQLSTATE 'SH000' THEN NULL;
            WHEN OTHERS THEN failure := pg_catalog.left(SQLERRM, {_ERROR_CHARS});
        END;
        done := failure IS NULL;
        outcome := pg_catalog.concat(outcome, CASE WHEN done
            THEN pg_catalog.json_build_object('rows', found)
            ELSE pg_catalog.json_build_object('error', failure) END, E'\\n');
    END IF;"""
