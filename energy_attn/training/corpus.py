"""Byte-level text corpora for training the GPT (vocab 256), with a fixed split by file.

The default corpus is always available offline: the ``.py`` files of the running interpreter's
standard library (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), in sorted
relative-path order. ``load_corpus(path)`` takes any text file or folder instead.

Split: a file goes to validation when ``crc32(relative path) % 1000 < 1000·val_fraction``, so the
split is fixed by the file names alone (stable across machines and when files are added).
A corpus whose files all land on one side (e.g. a single file) is split by bytes instead: the
last ``val_fraction`` of the concatenated text is validation.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "CorpusError", "check_val_fraction", "load_corpus", "stdlib_files"]

_SEPARATOR = b"\n\n"


class CorpusError(ValueError):
    """A corpus path that does not exist, holds no text, or is too small to train on."""


@dataclass
class Corpus:
    """Train/validation bytes as ``torch.uint8`` tensors, and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    num_files: int
    num_val_files: int

    def describe(self) -> str:
        return (f"{self.source}: {self.num_files} files ({self.num_val_files} validation), "
                f"{self.train.numel():,} train / {self.val.numel():,} validation bytes")


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's root and its ``.py`` files (sorted; no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py")
                    if p.is_file() and not {"site-packages", "dist-packages"} & set(p.parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _is_text(data: bytes) -> bool:
    return b"\x00" not in data[:8192]


def _folder_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                  key=lambda p: p.relative_to(root).as_posix())


def check_val_fraction(val_fraction) -> None:
    """ValueError unless ``val_fraction`` lies in ``(0, 1)`` (NaN does not)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def load_corpus(path=None, *, val_fraction: float = 0.05, min_bytes: int = 2) -> Corpus:
    """Load a byte-level corpus and split it into train/validation.

    Args:
        path: a text file or a folder (every non-hidden, non-binary file under it, in sorted
            order); None for the standard library's ``.py`` files.
        val_fraction: share of files (or bytes, see the module docstring) for validation,
            in ``(0, 1)``.
        min_bytes: each split must hold at least this many bytes (a training window of
            ``context`` tokens needs ``context + 1``).

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``.
        CorpusError: the path does not exist or is not a file/folder, holds no text, or a split
            is smaller than ``min_bytes``.
    """
    check_val_fraction(val_fraction)
    if path is None:
        root, files = stdlib_files()
        source = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise CorpusError(f"--data {path!s}: no such file or folder")
        if root.is_file():
            files, root = [root], root.parent
        elif root.is_dir():
            files = _folder_files(root)
        else:
            raise CorpusError(f"--data {path!s}: not a regular file or folder")
        source = str(path)
    texts, names = [], []
    for f in files:
        data = f.read_bytes()
        if data and _is_text(data):
            texts.append(data)
            names.append(f.relative_to(root).as_posix())
    if not texts:
        raise CorpusError(f"--data {source}: the corpus is empty (no non-empty text files)")
    threshold = round(1000 * val_fraction)
    is_val = [zlib.crc32(n.encode()) % 1000 < threshold for n in names]
    if all(is_val) or not any(is_val):
        blob = _SEPARATOR.join(texts)
        cut = int(len(blob) * (1 - val_fraction))
        train, val, n_val = blob[:cut], blob[cut:], 0
    else:
        train = _SEPARATOR.join(t for t, v in zip(texts, is_val) if not v)
        val = _SEPARATOR.join(t for t, v in zip(texts, is_val) if v)
        n_val = sum(is_val)
    for name, split in (("train", train), ("validation", val)):
        if len(split) < min_bytes:
            raise CorpusError(
                f"--data {source}: the {name} split has {len(split)} bytes, need at least "
                f"{min_bytes} (context + 1); use a larger corpus or a smaller --context")
    return Corpus(_as_tensor(train), _as_tensor(val), source, len(texts), n_val)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy
