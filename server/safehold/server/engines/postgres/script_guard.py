"""A lexer in front of psql: what reaches psql is SQL that stays in safehold's transaction.

An upload is data, never a command. psql would run any backslash meta-command
in it on safehold's host (`\\!` runs a shell, `\\o` writes files, `\\connect`
opens other databases), and any COMMIT or ROLLBACK would end the transaction
that makes a restore all-or-nothing. ScriptGuard splits the script into
statements the way psql's own lexer (psqlscan.l) does, and refuses:

- a backslash outside quotes and comments (every psql meta-command), except a
  line that is exactly pg_dump's own `\\restrict KEY` or `\\unrestrict KEY`,
  which it drops: safehold restricts psql itself, with a key of its own;
- a statement that controls transactions (BEGIN, START, COMMIT, END, ROLLBACK,
  ABORT, SAVEPOINT, RELEASE, PREPARE TRANSACTION), in any case or position;
- `SET standard_conforming_strings` to anything but on, which would make psql
  read quotes differently from this lexer.

pg_dump writes `BEGIN;` ... `COMMIT;` around large objects in a plain script,
and pg_restore's script (archive mode, `--single-transaction`) is wrapped in
one such pair. Those two bare statements, and only when they pair up, are
dropped rather than refused: what they wrap then runs inside safehold's
transaction, which is what they meant. In archive mode the pair must be there:
without it pg_restore's script was cut off.

This is the first of three locks. psql runs restricted (`\\restrict`) so that
no meta-command runs even if the lexer were wrong, and the session checks the
command tags psql prints so that a transaction end that got past both is known
for certain (engines/postgres/session.py).

Input comes in pieces of any size and memory stays bounded: strings,
comments and COPY data pass through as they are read, never held whole.
"""

from __future__ import annotations

import re

_MAX_HELD_BYTES = 1024 * 1024
"""A statement's first words are held until they are known; no real one is this long."""

_FORBIDDEN = frozenset(
    {b"BEGIN", b"START", b"COMMIT", b"END", b"ROLLBACK", b"ABORT", b"SAVEPOINT", b"RELEASE"}
)
_IDENT_START = rb"A-Za-z\x80-\xff_"
_TOKEN = re.compile(
    rb"(?P<space>[ \t\r\f\v]+)"
    rb"|(?P<newline>\n)"
    rb"|(?P<line_comment>--)"
    rb"|(?P<block_comment>/\*)"
    rb"|(?P<estring>[eE]')"
    rb"|(?P<ident>[" + _IDENT_START + rb"][" + _IDENT_START + rb"0-9$]*)"
    rb"|(?P<number>[0-9][" + _IDENT_START + rb"0-9.]*)"
    rb"|(?P<squote>')"
    rb"|(?P<dquote>\")"
    rb"|(?P<dollar>\$(?:[" + _IDENT_START + rb"][" + _IDENT_START + rb"0-9]*)?\$)"
    rb"|(?P<semicolon>;)"
    rb"|(?P<open>\()"
    rb"|(?P<close>\))"
    rb"|(?P<backslash>\\)"
    rb"|(?P<other>[^\s\-/'\"$;()\\" + _IDENT_START + rb"0-9]+|[\-/$])"
)
"""One token of psql's lexer at a position; identifiers may contain `$` after their
first character, so `a$b$` is a name and not a dollar quote."""
_INCOMPLETE_AT_END = re.compile(rb"(?:[" + _IDENT_START + rb"0-9$.]+|[-/eE])\Z")
_DOLLAR_PREFIX = re.compile(rb"\$(?:[" + _IDENT_START + rb"][" + _IDENT_START + rb"0-9]*)?\Z")
"""A token that more input could still extend: wait for it before deciding."""
_RESTRICT_LINE = re.compile(rb"\\(?:un)?restrict [A-Za-z0-9]+[ \t\r]*\n?")
_COPY_END = re.compile(rb"\n\\\.\r?\n")
_STD_STRINGS = b"STANDARD_CONFORMING_STRINGS"
_STD_STRINGS_ON = (
    [b"SET", _STD_STRINGS, b"=", b"ON"],
    [b"SET", _STD_STRINGS, b"TO", b"ON"],
)
_E_CONTINUE = re.compile(rb"[ \t\f]*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*'")
"""After an E'' string, whitespace with a newline and a quote continue it, still
with backslash escapes (psqlscan.l, quotecontinue in state xe)."""
_E_CONTINUE_PREFIX = re.compile(rb"(?:[ \t\n\r\f\v]|--[^\n\r]*)*\Z")


class UnsafeScript(Exception):
    """The script would run a meta-command or leave safehold's transaction."""


class ScriptGuard:
    """Passes a psql script through, statement by statement, refusing what could
    escape safehold's transaction or run on its host. feed() returns what may be
    sent on now; finish() says whether the script ended where a script may end."""

    def __init__(self, *, archive: bool) -> None:
        self._archive = archive
        self._buf = b""
        self._state = "normal"
        self._dollar_tag = b""
        self._comment_depth = 0
        self._line_start = True
        self._open = False
        """The script's own BEGIN is open (dropped); its COMMIT must follow."""
        self._pairs = 0
        self._reset_statement()

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        return self._scan(final=False)

    def finish(self) -> bytes:
        """What is left to send; raises UnsafeScript when the script is cut off."""
        out = self._scan(final=True)
        if self._state == "copy":
            raise UnsafeScript("the script ends inside the data of a COPY: it is incomplete")
        if self._state not in ("normal", "line comment"):
            raise UnsafeScript(f"the script ends inside a {self._state}: it is incomplete")
        if self._words or self._held or self._tokens:
            raise UnsafeScript("the script ends in the middle of a statement: it is incomplete")
        if self._open:
            raise UnsafeScript("the script ends inside its own BEGIN ... COMMIT: it is incomplete")
        if self._archive and not self._pairs:
            raise UnsafeScript("pg_restore's script ended without its COMMIT: it is incomplete")
        return out

    def _reset_statement(self) -> None:
        self._words: list[bytes] = []
        self._decided = False
        self._control = b""
        """BEGIN or COMMIT: a statement dropped if it turns out bare and paired."""
        self._held = b""
        self._paren_depth = 0
        self._begin_depth = 0
        self._copy_from = False
        self._copy_stdin = False
        self._tokens: list[bytes] = []
        """The statement's first tokens, upper-cased, to check a SET's value."""
        self._mentions_std_strings = False

    def _scan(self, *, final: bool) -> bytes:
        out = bytearray()
        pos = 0
        buf = self._buf
        while pos < len(buf):
            step = self._step(buf, pos, out, final)
            if step is None:
                break
            pos = step
        self._buf = buf[pos:]
        if len(self._buf) + len(self._held) > _MAX_HELD_BYTES:
            raise UnsafeScript("the script has a word or statement start over 1 MiB long")
        return bytes(out)

    def _step(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        """Consume one token or one run of quoted text; None when more input is needed."""
        handler = {
            "normal": self._token,
            "copy": self._copy_data,
            "copy header": self._copy_header,
            "estring end": self._estring_end,
            "squote": self._quoted,
            "estring": self._quoted,
            "dquote": self._quoted,
            "dollar quote": self._dollar_quoted,
            "block comment": self._block_comment,
            "line comment": self._line_comment,
        }[self._state]
        return handler(buf, pos, out, final)

    def _dollar_quoted(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        tag = self._dollar_tag
        end = buf.find(tag, pos)
        if end < 0:
            keep = len(buf) if final else max(pos, len(buf) - len(tag) + 1)
            self._emit(out, buf[pos:keep])
            return keep if keep > pos else None
        self._state = "normal"
        self._emit(out, buf[pos : end + len(tag)])
        return end + len(tag)

    def _line_comment(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        end = buf.find(b"\n", pos)
        if end < 0:
            self._emit(out, buf[pos:])
            return len(buf)
        self._state = "normal"
        self._emit(out, buf[pos:end])
        return end

    def _token(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        if self._line_start and buf[pos : pos + 1] == b"\\":
            line_end = buf.find(b"\n", pos)
            if line_end < 0 and not final:
                return None if len(buf) - pos < 256 else self._refuse_backslash()
            end = line_end + 1 if line_end >= 0 else len(buf)
            if not self._words and _RESTRICT_LINE.fullmatch(buf, pos, end):
                return end  # pg_dump's own \restrict: safehold restricts psql itself
            self._refuse_backslash()
        match = _TOKEN.match(buf, pos)
        assert match is not None  # every byte starts some token
        end = match.end()
        if not final and (
            (end == len(buf) and _INCOMPLETE_AT_END.search(match.group()))
            or (match.group() == b"$" and _DOLLAR_PREFIX.match(buf, pos))
        ):
            return None
        kind = match.lastgroup
        text = match.group()
        self._line_start = kind == "newline"
        if kind in ("space", "newline"):
            self._emit(out, text)
        elif kind == "line_comment":
            self._state = "line comment"
            self._emit(out, text)
        elif kind == "block_comment":
            self._state = "block comment"
            self._comment_depth = 1
            self._emit(out, text)
        elif kind == "backslash":
            self._refuse_backslash()
        elif kind == "semicolon":
            self._semicolon(out)
        else:
            self._word(kind or "", text, out)
        return end

    def _word(self, kind: str, text: bytes, out: bytearray) -> None:
        """Anything that belongs to a statement: a name, a number, a quote's start."""
        if kind == "ident":
            self._identifier(text)
        elif kind == "open":
            self._paren_depth += 1
        elif kind == "close":
            self._paren_depth = max(0, self._paren_depth - 1)
        elif kind in ("squote", "estring", "dquote"):
            self._state = "squote" if kind == "squote" else kind
            self._first_word(b"")
        elif kind == "dollar":
            self._state = "dollar quote"
            self._dollar_tag = text
            self._first_word(b"")
        else:
            self._first_word(b"")
        if len(self._tokens) < 8:
            self._tokens.append(text.upper())
        self._emit(out, text)

    def _identifier(self, text: bytes) -> None:
        word = text.upper()
        self._first_word(word)
        self._mentions_std_strings |= word == _STD_STRINGS
        words = self._words
        if len(words) < 8:
            words.append(word)
        # psql's heuristic for CREATE FUNCTION ... BEGIN ATOMIC ... END: semicolons
        # inside such a body do not end the statement (psqlscan.l, identifier rule).
        if _creates_routine(words) and self._paren_depth == 0:
            if word == b"BEGIN" or (word == b"CASE" and self._begin_depth >= 1):
                self._begin_depth += 1
            elif word == b"END" and self._begin_depth > 0:
                self._begin_depth -= 1
        if words[0] == b"COPY" and self._paren_depth == 0:
            if word == b"FROM":
                self._copy_from = True
            elif self._copy_from:
                self._copy_stdin = self._copy_stdin or word == b"STDIN"
                self._copy_from = False

    def _first_word(self, word: bytes) -> None:
        """Decide on a statement from its first word (two for PREPARE)."""
        if self._decided:
            return
        first = self._words[0] if self._words else word
        if first in (b"BEGIN", b"COMMIT") and not self._words:
            self._decided = True
            self._control = first
            return
        if first in _FORBIDDEN or (self._words == [b"PREPARE"] and word == b"TRANSACTION"):
            _refuse_control(b" ".join([*self._words, word]))
        if first == b"PREPARE" and not self._words:
            return  # PREPARE name AS ... is allowed; PREPARE TRANSACTION is not
        self._decided = True

    def _semicolon(self, out: bytearray) -> None:
        if self._paren_depth or self._begin_depth:
            self._emit(out, b";")
            return
        if self._mentions_std_strings and self._tokens not in _STD_STRINGS_ON:
            raise UnsafeScript(
                "the script changes standard_conforming_strings, which would change how its "
                "quotes are read; only `SET standard_conforming_strings = on` is allowed"
            )
        if self._words and self._words[0] in (b"SET", b"RESET") and self._tokens[1:2] == [b'"']:
            raise UnsafeScript("the script sets a setting by a quoted name, which is refused")
        if self._words and not self._decided:
            self._first_word(b"")
            self._decided = True
        if self._control:
            self._pair(self._control)
        self._emit(out, b";")
        copy = self._copy_stdin
        self._reset_statement()
        if copy:
            self._state = "copy header"

    def _pair(self, control: bytes) -> None:
        """A bare BEGIN opens, a bare COMMIT closes; anything else is refused."""
        if self._tokens != [control] or (control == b"BEGIN") == self._open:
            _refuse_control(b" ".join(self._tokens[:3]))
        self._open = control == b"BEGIN"
        self._pairs += control == b"COMMIT"

    def _emit(self, out: bytearray, text: bytes) -> None:
        """Send text on, or hold it while its statement's first words are unknown;
        a BEGIN or COMMIT is never sent."""
        if self._words and not self._decided:
            self._held += text
            return
        if self._held:
            if not self._control:
                out.extend(self._held)
            self._held = b""
        if not self._control:
            out.extend(text)

    def _quoted(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        """Inside '...', E'...' or "...": find the closing quote, doubled quotes
        (and in E'' strings backslash escapes) included."""
        state = self._state
        quote = b'"' if state == "dquote" else b"'"
        i = pos
        while True:
            j = buf.find(quote, i)
            if state == "estring":
                k = buf.find(b"\\", i, j if j >= 0 else len(buf))
                if k >= 0:
                    if k + 1 >= len(buf) and not final:
                        self._emit(out, buf[pos:k])
                        return k if k > pos else None
                    i = k + 2
                    continue
            if j < 0:
                self._emit(out, buf[pos:])
                return len(buf)
            if j + 1 >= len(buf) and not final:
                self._emit(out, buf[pos:j])
                return j if j > pos else None
            if buf[j + 1 : j + 2] == quote:
                i = j + 2
                continue
            self._state = "estring end" if state == "estring" else "normal"
            self._emit(out, buf[pos : j + 1])
            return j + 1

    def _estring_end(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        continued = _E_CONTINUE.match(buf, pos)
        if continued:
            self._state = "estring"
            self._emit(out, continued.group())
            return continued.end()
        if not final and _E_CONTINUE_PREFIX.match(buf, pos):
            return None  # blanks so far: a quote may yet continue the string
        self._state = "normal"
        return pos

    def _copy_header(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int:
        """psql runs what follows `COPY ... FROM stdin;` on its line after the data,
        so this lexer would read it as data: only blanks may be there."""
        end = buf.find(b"\n", pos)
        rest = buf[pos : end if end >= 0 else len(buf)]
        if rest.strip():
            raise UnsafeScript("text follows COPY ... FROM stdin on its line, which is refused")
        out.extend(rest)
        if end < 0:
            return len(buf)
        out.extend(b"\n")
        self._state = "copy"
        self._line_start = True
        return end + 1

    def _block_comment(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        """psql's block comments nest."""
        i = pos
        while self._comment_depth:
            opening, closing = buf.find(b"/*", i), buf.find(b"*/", i)
            if opening >= 0 and (closing < 0 or opening < closing):
                self._comment_depth += 1
                i = opening + 2
            elif closing >= 0:
                self._comment_depth -= 1
                i = closing + 2
            else:
                partial = buf.endswith((b"/", b"*")) and not final
                keep = max(i, len(buf) - 1 if partial else len(buf))
                self._emit(out, buf[pos:keep])
                return keep if keep > pos else None
        self._state = "normal"
        self._emit(out, buf[pos:i])
        return i

    def _copy_data(self, buf: bytes, pos: int, out: bytearray, final: bool) -> int | None:
        """COPY data is rows, never commands: pass it on up to its `\\.` line."""
        if self._line_start:
            for ending in (b"\\.\n", b"\\.\r\n"):
                if buf.startswith(ending, pos):
                    self._state = "normal"
                    out.extend(ending)
                    return pos + len(ending)
            if len(buf) - pos < 4 and not final and b"\n" not in buf[pos:]:
                return None
        self._line_start = False
        found = _COPY_END.search(buf, pos)
        rows = memoryview(buf)  # the bulk of a restore: copied once, into out, not sliced first
        if found:
            self._state = "normal"
            self._line_start = True
            out.extend(rows[pos : found.end()])
            return found.end()
        keep = max(pos, len(buf) - 4) if not final else len(buf)
        if keep == pos:
            return None
        out.extend(rows[pos:keep])
        self._line_start = buf[keep - 1 : keep] == b"\n"
        return keep

    def _refuse_backslash(self) -> int:
        raise UnsafeScript(
            "the script holds a psql meta-command (a backslash command such as \\! or "
            "\\connect): an upload is data, never a command, so it is refused"
        )


def _refuse_control(statement: bytes) -> None:
    raise UnsafeScript(
        f"the script controls its own transactions ({statement.decode('ascii', 'replace')}): "
        "it could commit part of a restore, so it is refused"
    )


def _creates_routine(words: list[bytes]) -> bool:
    """CREATE [OR REPLACE] FUNCTION|PROCEDURE, as psql recognises it."""
    head = words[:4]
    return head[:1] == [b"CREATE"] and (
        head[1:2] in ([b"FUNCTION"], [b"PROCEDURE"])
        or (head[1:3] == [b"OR", b"REPLACE"] and head[3:4] in ([b"FUNCTION"], [b"PROCEDURE"]))
    )
