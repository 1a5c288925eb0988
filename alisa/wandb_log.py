"""W&B logging, read from the result records (nothing imports this back).

One W&B run per grid point (config = the point, summary = its metrics per task),
grouped by experiment, plus a ``summary`` run with the trade-off table and the plots.
Offline by default: runs land in ``<results dir>/wandb/`` for ``wandb sync``.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("alisa.wandb")


def _never_fails(method):
    """W&B is a copy of the results (they are in ``points/``): a logging failure never ends a sweep.

    Online: fall back to offline runs in ``<run dir>/wandb/`` (one warning); offline: one warning,
    W&B off for the rest of the run.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._abandon()
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if self.mode == "online":
                self.mode = "offline"
                log.warning("W&B online logging failed (%s: %s): logging offline into %s from now on "
                            "(`wandb sync` later)", type(e).__name__, why, self.run_dir / "wandb")
                return wrapper(self, *args, **kwargs)
            log.warning("W&B logging failed (%s: %s): W&B is off for the rest of this run; the results are in %s",
                        type(e).__name__, why, self.run_dir / "points")
            self.mode = "disabled"
            return None

    return wrapper


class WandbLogger:
    def __init__(self, conf, run_dir: Path, experiment: str):
        self.mode, self.project, self.entity = conf.wandb, conf.project, conf.entity
        self.run_dir, self.experiment = Path(run_dir), experiment
        self._run = None

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def _init(self, name: str, config: dict):
        import wandb  # lazily: only when logging is on

        try:  # no system-metrics sampler (wandb-symon): nothing to sample between points
            settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        except Exception:  # noqa: BLE001 - a wandb without that setting
            settings = wandb.Settings(silent=True, console="off")
        self._run = wandb.init(project=self.project, entity=self.entity, group=self.experiment, name=name,
                               config=config, mode=self.mode, dir=str(self.run_dir), job_type="eval",
                               settings=settings)
        return self._run

    @_never_fails
    def log_point(self, point: dict, records: list[dict]) -> None:
        first = records[0]
        config = {**point, "experiment": self.experiment, "model": first["model"]["name"], "seed": first["seed"],
                  "limit": first.get("limit"), "prefill": first["prefill"], "git_commit": first["git_commit"]}
        run = self._init(first["point_id"], config)
        summary = {}
        for r in records:
            if "throughput" in r:  # a throughput workload: its measured figures
                for name, v in r["throughput"].items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        summary[f"{r['task']}/{name}"] = v
                continue
            for name, m in r["metrics"].items():
                summary[f"{r['task']}/{name}"] = m["value"]
                if m["stderr"] is not None:
                    summary[f"{r['task']}/{name}_stderr"] = m["stderr"]
            summary[f"{r['task']}/kept_fraction"] = r["kept_fraction"]["overall"]
        run.summary.update(summary)
        self.finish()

    @_never_fails
    def log_summary(self, summary: dict) -> None:
        import wandb

        run = self._init("summary", {"experiment": self.experiment})
        rows = summary["rows"]
        cols = list(rows[0])
        tables = {"summary": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}
        if summary.get("pareto"):
            pcols = [c for c in summary["pareto"][0] if c != "tasks"]
            tables["pareto"] = wandb.Table(columns=pcols, data=[[p[c] for c in pcols] for p in summary["pareto"]])
        run.log({**tables,
                 **{f"plots/{p.stem}": wandb.Image(str(p)) for p in summary["plots"]}})
        self.finish()

    def finish(self) -> None:
        """Finish the open run and stop W&B's service process (``wandb-core``).

        The service is started again for the next run (about half a second): between grid points,
        while a point computes, no W&B process exists, so a sweep killed there (even with SIGKILL)
        leaves none behind. Only a kill in the moment a run is being written can orphan it; it then
        exits by itself once it sees its parent gone, and the system's init reaps it (a container
        whose PID 1 does not reap orphans keeps it as ``<defunct>``: that is the container's init,
        not something a child process can avoid).
        """
        if self._run is None:
            return
        try:
            self._run.finish()
        finally:
            self._run = None
            _teardown()

    def _abandon(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the service is stopped below
                pass
        _teardown()


def _teardown() -> None:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - stopping the service is best effort
            pass


def read_offline_run(path: Path) -> dict:
    """Config, summary and logged keys of an offline ``run-*.wandb`` file (what ``wandb sync`` would upload).

    The file is a LevelDB-style log (32 KiB blocks of records: crc32c, length, type) of
    protobuf ``Record`` messages after a 7-byte ``:W&B`` header.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{str(path)!r} is not a W&B run file")
    out = {"name": None, "config": {}, "summary": {}, "history_keys": set()}
    block, off, chunks = 32768, 7, []
    while off + 7 <= len(data):
        room = block - off % block
        if room < 7:  # block trailer padding
            off += room
            continue
        length, kind = struct.unpack_from("<HB", data, off + 4)
        chunks.append(data[off + 7: off + 7 + length])
        off += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(b"".join(chunks))
            chunks = []
            which = rec.WhichOneof("record_type")
            if which == "run":
                out["name"] = rec.run.display_name
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif which == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif which == "summary":
                out["summary"].update({i.key: json.loads(i.value_json) for i in rec.summary.update})
            elif which == "history":
                out["history_keys"].update(i.key or ".".join(i.nested_key) for i in rec.history.item)
    return out
