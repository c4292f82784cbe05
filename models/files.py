"""What every reader of a weights file shares: the one error it raises and the content digest it checks."""
from __future__ import annotations

import hashlib
from pathlib import Path


class CheckpointLoadError(RuntimeError):
    """A checkpoint is missing, unreadable or does not hold what was asked; the message says which file."""


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's content (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
