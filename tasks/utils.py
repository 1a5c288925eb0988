"""Helpers for the offline `*_local` lm-eval task mirrors in this folder.

- ``load_local``: the ``custom_dataset`` of every task. lm-eval 0.4.13 calls it as
  ``custom_dataset(**metadata, **dataset_kwargs)`` (api/task.py ``ConfigurableTask.download``)
  and expects a ``datasets.DatasetDict``. The task's YAML names the data with
  ``dataset_kwargs: {alisa_task: ..., alisa_splits: [...]}``; the data folder is
  ``$ALISA_DATA_DIR`` (default ``~/.cache/alisa/data``) or ``--metadata '{"alisa_data_dir": DIR}'``.
- The stock tasks' ``!function`` helpers, re-exported from the installed lm_eval package
  (not copied), so prompts and scoring stay the stock ones.
- ``passkey_process_results``: the passkey task's metric.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from alisa import data as _data
except ImportError:  # running lm_eval from a checkout where alisa is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from alisa import data as _data

# Stock helpers (lm_eval/tasks/...), re-exported under task-prefixed names.
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.mathqa.utils import doc_to_choice as mathqa_doc_to_choice  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import (  # noqa: F401
    doc_to_choice as copa_doc_to_choice,
    doc_to_target as copa_doc_to_target,
    doc_to_text as copa_doc_to_text,
)
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results as wikitext_process_results,
    wikitext_detokenizer,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)


def load_local(alisa_task: str, alisa_splits=None, alisa_data_dir=None, **_ignored):
    """``custom_dataset`` for the `*_local` tasks: the prepared JSONL splits as a DatasetDict.

    ``_ignored`` swallows the rest of the task metadata (``version``, and the model_args that
    lm-eval's ``simple_evaluate`` merges into it). A missing folder or file raises
    ``alisa.data.DataNotPrepared`` with a one-line message naming it and saying to run
    ``python -m alisa.data prepare``.
    """
    try:
        return _data.load_dataset_dict(alisa_task, alisa_splits, alisa_data_dir)
    except _data.DataError:
        _one_line_if_uncaught()
        raise


def _one_line_if_uncaught() -> None:
    """If the DataError reaches the top level uncaught (the lm_eval shell command), print it as
    one ``error: ...`` line instead of a traceback through lm-eval's task loader. Callers that
    catch it (Python API, pytest) see the exception unchanged."""
    prev = sys.excepthook
    if getattr(prev, "_alisa_one_line", False):
        return

    def hook(exc_type, exc, tb):
        if isinstance(exc, _data.DataError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            prev(exc_type, exc, tb)

    hook._alisa_one_line = True
    sys.excepthook = hook


def passkey_process_results(doc, results):
    """acc = 1 iff the generated text contains the pass key's digits."""
    (generation,) = results
    return {"acc": int(str(doc["answer"]) in generation)}
