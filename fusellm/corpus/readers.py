"""Reading corpus inputs into documents, with problems named by file and line.

Every reader yields :class:`RawDoc` and reports bad records to a :class:`Problems`
object: in ``error`` mode the first problem raises :class:`CorpusInputError` naming
file, line (row for parquet/datasets) and reason; in ``skip`` mode it is counted per
reason and the counts land in the stage manifest.

Reasons: ``malformed_json``, ``not_an_object``, ``missing_field`` (text or id field absent
or null), ``not_a_string``, ``non_utf8`` (a jsonl line or a text file: one count),
``empty`` (fewer than ``min_chars`` non-space characters), ``bad_conversation`` (a
chat record that :func:`fusellm.chat.conversation` refuses, with its reason), ``bad_schema`` (a parquet file
or saved dataset without the text/id column, or whose text column is not a string type:
one count per file), ``bad_file`` (unreadable), ``duplicate_id``. Lines count from 1;
parquet and dataset records by row from 1; ``:0`` is the file as a whole (its schema).
"""

from __future__ import annotations

import glob
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fusellm.chat import ConversationError, Turn, conversation
from fusellm.corpus.config import CorpusInput
from fusellm.packages import resolve_pkg_path


class CorpusInputError(ValueError):
    """Malformed corpus input; the message starts with ``file:line:``."""


@dataclass
class RawDoc:
    id: str
    text: str  # a conversation's: its assistant responses, one paragraph each
    domain: str
    origin: str  # "file:line" where it came from
    turns: list[Turn] | None = None  # a conversation (format: chat)


@dataclass
class Problems:
    on_error: str = "error"
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def report(self, reason: str, where: str, detail: str) -> None:
        msg = f"{where}: {reason}: {detail}"
        if self.on_error == "error":
            raise CorpusInputError(
                msg + "  (set corpus.on_error: skip to count and skip such records)"
            )
        self.counts[reason] += 1
        self.examples.setdefault(reason, msg)


def input_files(inp: CorpusInput) -> list[Path]:
    """Files (or dataset directories) named by ``inp.path``: a file, a directory, a glob."""
    base = str(resolve_pkg_path(inp.path))
    p = Path(base)
    if any(c in base for c in "*?["):
        files = sorted(Path(x) for x in glob.glob(base, recursive=True))
    elif p.is_dir() and not _is_saved_dataset(p):
        files = sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith("."))
    else:
        files = [p]
    if not files or not files[0].exists():
        raise CorpusInputError(f"{inp.path}: no such file, directory or matching files")
    return files


def _is_saved_dataset(p: Path) -> bool:
    return (
        (p / "dataset_info.json").exists()
        or (p / "dataset_dict.json").exists()
        or (p / "state.json").exists()
    )


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "disk"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def read_input(inp: CorpusInput, problems: Problems, min_chars: int = 1) -> Iterator[RawDoc]:
    n = 0
    for path in input_files(inp):
        fmt = inp.format if inp.format != "auto" else detect_format(path)
        reader = {
            "jsonl": _read_jsonl,
            "parquet": _read_parquet,
            "text": _read_text,
            "disk": _read_disk,
            "chat": _read_chat,
        }[fmt]
        for doc in reader(path, inp, problems):
            if len(doc.text.strip()) < min_chars:
                problems.report(
                    "empty", doc.origin, f"document has fewer than {min_chars} non-space characters"
                )
                continue
            yield doc
            n += 1
            if inp.max_docs is not None and n >= inp.max_docs:
                return


def _domain(inp: CorpusInput, path: Path) -> str:
    return inp.domain or path.name.split(".")[0]


def _doc_from_record(
    rec: object, inp: CorpusInput, path: Path, where: str, default_id: str, problems: Problems
):
    if not isinstance(rec, dict):
        problems.report("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
        return None
    text = rec.get(inp.text_field)
    if text is None:
        problems.report(
            "missing_field", where, f"no '{inp.text_field}' field (keys: {sorted(rec)[:8]})"
        )
        return None
    if not isinstance(text, str):
        problems.report(
            "not_a_string", where, f"'{inp.text_field}' is {type(text).__name__}, not a string"
        )
        return None
    if inp.id_field is not None:
        doc_id = rec.get(inp.id_field)
        if doc_id is None:
            problems.report("missing_field", where, f"no '{inp.id_field}' id field")
            return None
        doc_id = str(doc_id)
    else:
        doc_id = default_id
    return RawDoc(doc_id, text, _domain(inp, path), where)


def _read_jsonl(
    path: Path, inp: CorpusInput, problems: Problems, chat: bool = False
) -> Iterator[RawDoc]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.report(
                    "non_utf8",
                    where,
                    f"invalid UTF-8 byte {raw[e.start]:#04x} at column {e.start + 1}",
                )
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.report("malformed_json", where, f"{e.msg} at column {e.colno}")
                continue
            turns = None
            if chat:
                try:
                    turns = conversation(rec if isinstance(rec, dict) else {}, where)
                except ConversationError as e:
                    problems.report("bad_conversation", where, str(e).removeprefix(f"{where}: "))
                    continue
                responses = [t.content for t in turns if t.role == "assistant"]
                rec = {**rec, inp.text_field: "\n\n".join(responses)}
            doc = _doc_from_record(rec, inp, path, where, f"{path.name}:{lineno}", problems)
            if doc is not None:
                doc.turns = turns
                yield doc


def _read_chat(path: Path, inp: CorpusInput, problems: Problems) -> Iterator[RawDoc]:
    """Conversations, one JSON object per line; the document's text is its responses."""
    yield from _read_jsonl(path, inp, problems, chat=True)


def _read_text(path: Path, inp: CorpusInput, problems: Problems) -> Iterator[RawDoc]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.report("non_utf8", f"{path}:{line}", f"invalid UTF-8 byte {data[e.start]:#04x}")
        return
    text = text.removeprefix("\ufeff")
    if inp.text_unit == "file":
        yield RawDoc(path.name, text, _domain(inp, path), f"{path}:1")
        return
    line = 1
    for i, para in enumerate(text.split("\n\n")):
        if para.strip():
            yield RawDoc(f"{path.name}:p{i}", para, _domain(inp, path), f"{path}:{line}")
        line += para.count("\n") + 2


def _read_parquet(path: Path, inp: CorpusInput, problems: Problems) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        problems.report("bad_file", f"{path}:0", f"not a readable parquet file ({e})")
        return
    names = pf.schema_arrow.names
    wanted = [inp.text_field] + ([inp.id_field] if inp.id_field else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        problems.report(
            "bad_schema", f"{path}:0", f"missing column(s) {missing}; columns are {names}"
        )
        return
    text_type = pf.schema_arrow.field(inp.text_field).type
    if not _is_text_type(text_type):
        # One report for the file, not one per row: every row would fail the same way.
        problems.report(
            "bad_schema", f"{path}:0", f"column '{inp.text_field}' has type {text_type}, not string"
        )
        return
    row = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            doc = _doc_from_record(rec, inp, path, f"{path}:{row}", f"{path.name}:{row}", problems)
            if doc is not None:
                yield doc


def _is_text_type(t) -> bool:
    """An arrow string column (plain, large, view, or dictionary-encoded strings)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _read_disk(path: Path, inp: CorpusInput, problems: Problems) -> Iterator[RawDoc]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        problems.report("bad_file", f"{path}:0", f"not a dataset saved with save_to_disk ({e})")
        return
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, d in parts:
        label = f"{path}[{split}]" if split else str(path)
        if inp.text_field not in d.column_names:
            problems.report(
                "bad_schema",
                f"{label}:0",
                f"no column '{inp.text_field}'; columns are {d.column_names}",
            )
            continue
        for row, rec in enumerate(d, 1):
            doc = _doc_from_record(
                rec, inp, path, f"{label}:{row}", f"{path.name}:{split or ''}:{row}", problems
            )
            if doc is not None:
                yield doc
