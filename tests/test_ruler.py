"""The offline RULER tasks (alisa/ruler.py, tasks/ruler/): deterministic documents of the stated length in
SmolLM2 tokens whose answers are right, generated with no download, and scored through lm-eval.

The lm-eval run uses a tiny random LLaMA with the embedded SmolLM2 tokenizer (the pipeline, not accuracy);
the scoring is checked on the documents' own answers.
"""

from __future__ import annotations

import collections
import re
import warnings
from pathlib import Path

import pytest
import torch

from alisa import ruler as R

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
ONE_K = [f"ruler_{k}_1k_local" for k in R.KINDS]


@pytest.fixture(scope="module")
def task_manager(data_root):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"alisa_data_dir": str(data_root)})


def test_registered_tasks_and_groups(task_manager):
    names = set(task_manager.all_tasks)
    for length in R.LENGTHS:
        assert {f"ruler_{k}_{length}_local" for k in R.KINDS} <= names
        assert f"ruler_{length}_local" in names
    assert "ruler_local" in names
    assert not any(n.startswith("_ruler") for n in names)  # the shared template is not a task


@pytest.mark.parametrize("kind", list(R.KINDS))
def test_documents_are_deterministic_and_fill_their_length(data_root, kind):
    docs = R.documents(kind, "1k", 3, data_root)
    again = [R.document(kind, "1k", i, data_root) for i in range(3)]  # generated afresh, one at a time
    assert docs == again
    assert R.document(kind, "1k", 2, data_root) == docs[2]  # a document does not depend on the others
    tok = R.tokenizer()
    for d in docs:
        assert set(d) >= {"index", "input", "outputs", "gen_prefix", "length", "max_length"}
        prompt_tokens = len(tok(f"{d['input']} {d['gen_prefix']}").input_ids)
        assert d["length"] == prompt_tokens + R.KINDS[kind] and d["max_length"] == 1024
        assert 0.85 * 1024 <= d["length"] <= 1024, d["length"]  # the haystack fills the target
        assert d["outputs"] and all(o in d["input"] for o in d["outputs"])
    assert len({d["input"] for d in docs}) == 3


def test_4k_documents_fit(data_root):
    for kind in ("niah_multivalue", "cwe"):
        d = R.document(kind, "4k", 0, data_root)
        assert 0.9 * 4096 <= d["length"] <= 4096


def test_needles_sit_at_their_depths(data_root):
    for kind, (keys, values, queries) in R.NIAH.items():
        d = R.document(kind, "1k", 1, data_root)
        needles = re.findall(r"One of the special magic numbers for ([a-z\- ]+) is: (\d{7})\.", d["input"])
        assert len(needles) == keys * values and len(d["depths"]) == keys * values
        assert len(d["outputs"]) == queries * values
        assert all(any(v == o for _, v in needles) for o in d["outputs"])
        pieces = R._SENTENCE_END.split(d["input"].split("\n")[1])  # the haystack's sentences and the needles
        at = [i for i, p in enumerate(pieces) if p.startswith("One of the special magic numbers")]
        hay = len(pieces) - len(at)
        for k, (depth, i) in enumerate(zip(d["depths"], at)):  # shallowest first
            assert abs((i - k) - hay * depth / 100) <= 2, (kind, depth, i - k, hay)  # to a sentence or two
        asked = d["gen_prefix"].removeprefix("The special magic ").split(" for ", 1)[1]
        assert all(k in asked for k, v in needles if v in d["outputs"])


def test_answers_are_the_right_ones(data_root):
    # variable tracking: every answer name is linked by the chain to the value the question asks for
    d = R.document("vt", "1k", 0, data_root)
    question = d["input"].rsplit("Question:", 1)[1]
    value = re.search(r"assigned the value (\d+)", question).group(1)
    real = d["input"].rsplit("\n\nMemorize", 1)[1]  # after the worked example
    links = dict(re.findall(r"VAR ([A-Z]+) = (?:VAR )?([A-Z]+|\d+)", real))
    for name in d["outputs"]:
        seen = name
        while seen in links:
            seen = links[seen]
        assert seen == value
    assert len(d["outputs"]) == R.VT_HOPS + 1 and value in d["gen_prefix"]
    # common words: the 10 answers are each more frequent than every other word of the list
    d = R.document("cwe", "1k", 0, data_root)
    listed = d["input"].rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
    counts = collections.Counter(re.findall(r"\d+\. (\S+)", listed))
    assert min(counts[w] for w in d["outputs"]) > max(c for w, c in counts.items() if w not in d["outputs"])
    # frequent words: the 3 answers are the most frequent coded words, "..." aside
    d = R.document("fwe", "1k", 0, data_root)
    counts = collections.Counter(d["input"].split("coded words. ", 1)[1].split("\nQuestion:")[0].split())
    top = [w for w, _ in counts.most_common() if w != "..."][:4]
    assert top[:3] == d["outputs"] and counts[top[2]] > counts[top[3]]


def test_bad_names_are_one_line_errors(data_root):
    with pytest.raises(R.RulerError, match=r"^unknown RULER task 'niah_singel': allowed are niah_single, "):
        R.document("niah_singel", "1k", 0, data_root)
    with pytest.raises(R.RulerError, match=r"^unknown RULER length '3k': allowed are 1k, 2k, 4k$"):
        R.document("vt", "3k", 0, data_root)


def test_missing_data_folder_is_named(tmp_path):
    from alisa.data import DataNotPrepared

    with pytest.raises(DataNotPrepared, match="python -m alisa.data prepare"):
        R.document("niah_single", "1k", 0, tmp_path / "nothing")


def _tiny_alisa_lm(policy: str, **kw):
    """AlisaLM over a 2-layer random LLaMA that reads SmolLM2's tokenizer (fast: the pipeline, not accuracy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alisa.lm_eval_model import AlisaLM

    tok = R.tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return AlisaLM(pretrained=model, tokenizer=tok, policy=policy, batch_size=1, **kw)


def test_tasks_run_offline_through_lm_eval(task_manager):
    """The seven 1k tasks, two documents each, under swa@0.8, through lm-eval's own evaluator; scores in [0, 1]
    and the documents' own answers score 1 (the greedy continuation of a random model scores ~0)."""
    from lm_eval import simple_evaluate

    lm = _tiny_alisa_lm("swa", sparsity=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = simple_evaluate(model=lm, tasks=ONE_K, limit=2, task_manager=task_manager, log_samples=True,
                              gen_kwargs={"max_gen_toks": 4}, bootstrap_iters=0)
    assert 0 < lm.run.kept_fraction()["overall"] < 1  # the policy was applied to the 1k prompts
    for name in ONE_K:
        assert out["n-samples"][name]["effective"] == 2 and out["n-samples"][name]["original"] == R.DOCS
        assert 0.0 <= out["results"][name]["string_match,none"] <= 1.0
        for s in out["samples"][name]:
            doc = s["doc"]
            assert s["arguments"][0][0] == f"{doc['input']} {doc['gen_prefix']}"  # RULER's prompt: input, answer prefix
    task = task_manager.load(["ruler_niah_multivalue_1k_local"])["tasks"]["ruler_niah_multivalue_1k_local"]
    doc = task.eval_docs[0]
    assert task.process_results(doc, [" " + ", ".join(doc["outputs"]) + "."]) == {"string_match": 1.0}
    assert task.process_results(doc, [f" {doc['outputs'][0]} and nothing else"]) == {"string_match": 0.25}
    assert task.process_results(doc, [" I do not know"]) == {"string_match": 0.0}


def test_task_files_match_the_generator():
    """Each task's YAML names its kind and length, and its max_gen_toks is the room its documents leave."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for kind, budget in R.KINDS.items():
        for length in R.LENGTHS:
            cfg = load_yaml(TASKS_DIR / "ruler" / f"ruler_{kind}_{length}_local.yaml", resolve_func=False, recursive=True)
            assert cfg["dataset_kwargs"] == {"ruler_task": kind, "ruler_length": length}
            assert cfg["generation_kwargs"]["max_gen_toks"] == budget and cfg["generation_kwargs"]["until"] == ["\n"]
            assert cfg["num_fewshot"] == 0 and [m["metric"] for m in cfg["metric_list"]] == ["string_match"]
