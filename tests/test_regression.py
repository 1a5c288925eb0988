"""CI accuracy regression: ci_regression against results/golden/ci_regression.json (a few minutes)."""

import copy
import json

import pytest

from alisa.regression import GOLDEN, GoldenError, _run_ci_experiment, compare, load_golden, main


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, data_root):
    return _run_ci_experiment(tmp_path_factory.mktemp("results"))


def test_accuracy_matches_golden(ci_run):
    problems = compare(ci_run, load_golden())
    assert problems == [], "\n".join(problems)


def test_a_changed_behaviour_fails(ci_run, tmp_path):
    """As if swa's behaviour had moved: a golden value it no longer reproduces is named, exit 1."""
    golden = load_golden()
    moved = copy.deepcopy(golden)
    key = "swa-s0.8/wikitext_local/word_perplexity"
    moved["values"][key]["value"] *= 1.01
    moved["values"]["swa-s0.8/copa_local/acc"]["value"] += 2 / 16
    moved["values"]["dense-s0/piqa_local/acc"]["value"] += 1 / 16  # dense allows no flip at all
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(moved))
    problems = compare(ci_run, moved)
    assert [p.split(":")[0] for p in problems] == ["dense-s0/piqa_local/acc", "swa-s0.8/copa_local/acc", key]
    assert main(["check", str(ci_run), "--golden", str(path)]) == 1
    assert main(["check", str(ci_run), "--golden", str(GOLDEN)]) == 0


def test_corrupt_golden_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "golden.json"
    bad.write_text('{"values": {"dense-s0/copa_local/acc": ')
    with pytest.raises(GoldenError, match="is corrupt"):
        load_golden(bad)
    assert main(["check", str(tmp_path), "--golden", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: golden file") and "python -m alisa.regression update" in err[0]


@pytest.mark.slow
def test_a_real_behaviour_change_is_caught(tmp_path, monkeypatch, data_root):
    """SWA's score window made one query longer than the k of docs/semantics.md §2: the guard names swa's metrics, nothing else."""
    import alisa.policies as P

    half = P.SWA.half_count
    original = P.SWA._observe_one

    def observe_one(self, state, t, row):
        monkeypatch.setattr(self, "half_count", lambda n: half(self, n) + 1, raising=False)
        try:
            return original(self, state, t, row)
        finally:
            monkeypatch.delattr(self, "half_count")

    monkeypatch.setattr(P.SWA, "_observe_one", observe_one)
    monkeypatch.setattr(P.SWA, "kernel", None)  # the compiled (numba) route has its own observe: run the Python one
    problems = compare(_run_ci_experiment(tmp_path), load_golden())
    assert problems and all(p.startswith("swa-s0.8/") for p in problems), problems
