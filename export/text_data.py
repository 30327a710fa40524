"""An offline English corpus: sentences from the docstrings of Python's standard library.

Real prose written by people (documentation), on every machine that has Python, nothing
downloaded. Source files are parsed with ``ast`` (never imported). Held-out text comes from other
source files than training text: a file goes to "test" when a hash of its relative path says so.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CorpusConfig", "docstring_sentences", "load_corpus"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_CHARS = re.compile(r"[{}\[\]<>=_|\\`#@$]|::|\(\)|>>>|\.\.\.")


@dataclass(frozen=True)
class CorpusConfig:
    """min_words / max_words: sentence length bounds. test_share: share of source files held out.
    packages: stdlib top-level modules or packages to read (deterministic, present in CPython 3.9+)."""

    min_words: int = 6
    max_words: int = 40
    test_share: float = 0.2
    packages: tuple[str, ...] = (
        "argparse.py", "asyncio", "calendar.py", "collections", "concurrent", "configparser.py", "csv.py",
        "dataclasses.py", "datetime.py", "decimal.py", "difflib.py", "email", "enum.py", "fractions.py",
        "ftplib.py", "functools.py", "gettext.py", "gzip.py", "http", "imaplib.py", "importlib", "inspect.py",
        "ipaddress.py", "json", "logging", "mailbox.py", "multiprocessing", "nntplib.py", "optparse.py",
        "pathlib.py", "pickle.py", "pdb.py", "poplib.py", "pydoc.py", "random.py", "shutil.py", "smtplib.py",
        "socket.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
        "threading.py", "tkinter", "turtle.py", "typing.py", "unittest", "urllib", "uuid.py", "xml", "zipfile.py",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0.0 < self.test_share < 1.0:
            raise ValueError(f"test_share must be in (0, 1), got {self.test_share}")


def _clean_sentence(text: str, cfg: CorpusConfig) -> str | None:
    text = " ".join(text.split())
    words = text.split(" ")
    if not cfg.min_words <= len(words) <= cfg.max_words or _CODE_CHARS.search(text):
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters < 0.9 * len(text) or not text[0].isupper() or text[-1] not in ".!?":
        return None
    return text


def docstring_sentences(source: str, cfg: CorpusConfig = CorpusConfig()) -> list[str]:
    """Python source text -> the prose sentences of its docstrings, in order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                if para.lstrip().startswith((">>>", "..", ":", "-", "*")):
                    continue
                for sentence in _SENTENCE_END.split(" ".join(para.split())):
                    clean = _clean_sentence(sentence, cfg)
                    if clean:
                        out.append(clean)
    return out


def _source_files(root: Path, cfg: CorpusConfig) -> list[Path]:
    files = []
    for name in cfg.packages:
        path = root / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*.py")) if "test" not in p.relative_to(root).parts[1:2])
    return files


def load_corpus(split: str, cfg: CorpusConfig = CorpusConfig(), limit: int | None = None,
                root: Path | None = None) -> list[str]:
    """Unique sentences of one split ("train" or "test"), in a fixed order; at most ``limit``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen = set(load_corpus("train", cfg, root=root)) if split == "test" else set()
    out = []
    for path in _source_files(root, cfg):
        rel = path.relative_to(root).as_posix()
        bucket = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if (bucket < cfg.test_share) != (split == "test"):
            continue
        for sentence in docstring_sentences(path.read_text(encoding="utf-8", errors="replace"), cfg):
            if sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    if not out:
        raise FileNotFoundError(f"no docstring sentences found under {root}")
    return out[:limit] if limit else out
