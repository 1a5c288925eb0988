"""The lm-eval model `alisa`: dense equals stock lm-eval `hf` per document; the shell command works."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = str(REPO / "tasks")


def _per_doc(out, task):
    """{doc_id: ([log-likelihood per choice], acc)} from simple_evaluate(log_samples=True)."""
    return {s["doc_id"]: ([float(r[0][0]) for r in s["resps"]], s["acc"]) for s in out["samples"][task]}


def test_dense_alisa_equals_stock_hf_per_document(data_root, smollm2):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from alisa.lm_eval_model import AlisaLM
    from alisa.models import _embedded_folder

    tm = TaskManager(include_path=TASKS, include_defaults=False)
    kw = dict(tasks=["copa_local", "piqa_local"], num_fewshot=4, limit=12, task_manager=tm, log_samples=True,
              random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, bootstrap_iters=0)
    stock = simple_evaluate(model=HFLM(pretrained=str(_embedded_folder()), device="cpu", batch_size=1), **kw)
    model, tok = smollm2
    lm = AlisaLM(pretrained=model, tokenizer=tok, policy="dense")
    try:
        ours = simple_evaluate(model=lm, **kw)
    finally:
        lm.close()
    for task in kw["tasks"]:
        a, b = _per_doc(stock, task), _per_doc(ours, task)
        assert sorted(a) == sorted(b) and len(a) == 12
        for doc in a:
            assert a[doc][1] == b[doc][1]
            assert max(abs(x - y) for x, y in zip(a[doc][0], b[doc][0])) < 1e-4, (task, doc, a[doc], b[doc])
        assert stock["results"][task]["acc,none"] == ours["results"][task]["acc,none"]


def test_lm_eval_shell_command_runs_alisa(data_root, tmp_path):
    r = subprocess.run(["lm_eval", "--model", "alisa", "--model_args", "pretrained=smollm2-135m,policy=swa,sparsity=0.8",
                        "--tasks", "copa_local", "--include_path", TASKS, "--limit", "4", "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alisa (" in r.stdout and "'policy': 'swa'" in r.stdout and "copa_local" in r.stdout
