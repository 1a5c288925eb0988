"""Makes ``lm_eval --model alisa`` work from a shell.

lm-eval 0.4 discovers models only from its own static table, so a one-line ``.pth``
file in site-packages (written by ``python -m alisa.lm_eval_plugin install``; the setup
script runs it) registers the lazy placeholder ``alisa -> alisa.lm_eval_model:AlisaLM``
when, and only when, the interpreter runs the ``lm_eval`` command. Nothing is imported
otherwise, and nothing heavy is imported until lm-eval asks for the model.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "alisa-lm-eval.pth"
PTH_LINE = ("import sys; (any(a.replace('\\\\', '/').rsplit('/', 1)[-1] in ('lm_eval', 'lm-eval', 'lm_eval.exe') "
            "for a in sys.orig_argv[1:3]) or sys.orig_argv[1:3] == ['-m', 'lm_eval']) "
            "and __import__('alisa.lm_eval_plugin').lm_eval_plugin.register()\n")


_CLI = False


def cli_active() -> bool:
    """Whether this interpreter runs the ``lm_eval`` command (then a bad ``--model_args`` is one line, exit 2)."""
    return _CLI


def register() -> None:
    global _CLI
    _CLI = True  # register() runs from the .pth hook only when the interpreter runs the lm_eval command
    import lm_eval.models  # noqa: F401  (the stock placeholders, so that 'hf' etc. still resolve)
    from lm_eval.api.registry import model_registry

    if "alisa" not in model_registry:
        model_registry.register("alisa", target="alisa.lm_eval_model:AlisaLM")


def install(site_dir: str | None = None) -> Path:
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    path.write_text(PTH_LINE)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        print("usage: python -m alisa.lm_eval_plugin install", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {install()}")
