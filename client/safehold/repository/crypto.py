"""age encryption of backups with the caller's own keys, through pyrage (rage's bindings).

Both directions stream: pyrage's encrypt_io/decrypt_io read and write in 64 KiB age
STREAM chunks, so memory does not grow with the backup. Encryption pulls the plaintext
from a reader; decryption pushes plaintext into a writer, which a thread turns back
into a reader (a bounded queue between them) for the restore upload to pull from.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pyrage
from pyrage import ssh, x25519

from safehold.client.errors import EncryptionKeyError
from safehold.streams import ChunksReader

Recipient = Any
"""A pyrage x25519 or SSH recipient (pyrage ships no type stubs)."""
Identity = Any

_QUEUE_CHUNKS = 8
"""Decrypted chunks (64 KiB each) waiting for the upload: the decryption's memory bound."""


def parse_recipient(text: str) -> Recipient:
    """An age X25519 public key (age1...) or an SSH public key (ssh-ed25519/ssh-rsa ...)."""
    text = text.strip()
    try:
        if text.startswith("age1"):
            return x25519.Recipient.from_str(text)
        if text.startswith("ssh-"):
            return ssh.Recipient.from_str(text)
    except pyrage.RecipientError as err:
        raise EncryptionKeyError(f"not a valid age recipient: {text[:24]}...: {err}") from None
    raise EncryptionKeyError(
        f"not an age recipient (age1... or an SSH public key): {text[:24]}...",
    )


def load_recipients(recipients: Iterable[str], files: Iterable[Path]) -> list[Recipient]:
    """--recipient values and --recipients-file lines (# comments and blanks skipped)."""
    texts = list(recipients)
    for path in files:
        lines = path.read_text().splitlines()
        texts += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [parse_recipient(t) for t in texts]


def load_identities(paths: Iterable[Path]) -> list[Identity]:
    """-i files: age identity files (AGE-SECRET-KEY-... lines) or unencrypted SSH private keys."""
    identities: list[Identity] = []
    for path in paths:
        data = path.read_bytes()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                identities.append(ssh.Identity.from_buffer(data))
                continue
            lines = data.decode().splitlines()
            keys = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
            identities += [x25519.Identity.from_str(k) for k in keys]
        except (pyrage.IdentityError, UnicodeDecodeError):
            # Named by path only: a parser's message could quote the secret key.
            raise EncryptionKeyError(
                f"{path} is not a usable age identity or unencrypted SSH private key "
                "(passphrase-protected SSH keys are not supported)"
            ) from None
        if not keys:
            raise EncryptionKeyError(f"{path} holds no age identity (AGE-SECRET-KEY-...)")
    return identities


def encrypt(source: BinaryIO, out: BinaryIO, recipients: Sequence[Recipient]) -> None:
    """Encrypt source to its end into out. pyrage wraps an error of source in its own;
    a source that keeps its error in `.error` (streams.HashingReader) has it raised as is."""
    try:
        pyrage.encrypt_io(source, out, list(recipients))
    except pyrage.EncryptError:
        raise _original(source) from None


def _original(source: BinaryIO) -> BaseException:
    error = getattr(source, "error", None)
    return error if error is not None else EncryptionKeyError("age encryption failed")


class DecryptingReader(ChunksReader):
    """The plaintext of an age stream, decrypted by a thread as it is read."""

    def __init__(self, stored: BinaryIO, identities: Sequence[Identity], name: str) -> None:
        super().__init__(self._from_queue())
        self._name = name
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_CHUNKS)
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(stored, list(identities)), name="age-decrypt", daemon=True
        )
        self._thread.start()

    def _run(self, stored: BinaryIO, identities: list[Identity]) -> None:
        try:
            pyrage.decrypt_io(stored, _QueueWriter(self._queue, self._closing), identities)
        except BaseException as err:
            self._put(err)
        else:
            self._put(None)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _from_queue(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not None:
            if isinstance(item, BaseException):
                raise EncryptionKeyError(
                    f"cannot decrypt {self._name} with the given identity (-i), or it is "
                    f"damaged (run safehold verify): {item}",
                    reason="DECRYPTION_FAILED",
                ) from None
            yield item

    def close(self) -> None:
        self._closing.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        super().close()


class _QueueWriter(io.RawIOBase):
    def __init__(self, out: queue.Queue[bytes | BaseException | None], closing: threading.Event):
        self._out = out
        self._closing = closing

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        while True:
            if self._closing.is_set():
                raise BrokenPipeError("the reader went away")
            try:
                self._out.put(chunk, timeout=0.1)
                return len(chunk)
            except queue.Full:
                continue
