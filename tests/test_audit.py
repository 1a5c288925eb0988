"""The replay audit (alisa.runtime.audit): what it detects, and what it finds in the runtime's step."""

import pytest
import torch

from alisa import attention
from alisa.policies import available, make_policy
from alisa.runtime.audit import audit_decode, compare, main, trace_call
from alisa.runtime.engine import Engine
from alisa.testing import tiny_model


def test_trace_lists_read_backs_and_data_dependent_shapes():
    x = torch.arange(6.0)
    trace, _ = trace_call(lambda: (x.sum().item(), bool(x.any()), x.nonzero()))
    assert len(trace.syncs) == 2  # .item() and bool() (aten names vary: _local_scalar_dense, is_nonzero)
    assert [o.name for o in trace.dynamic] == ["nonzero"]
    assert all("test_audit.py" in o.where for o in trace.syncs)


def test_kernels_exclude_views_and_no_op_conversions():
    x, buf = torch.ones(4, 3), torch.zeros(12)

    def step(x):
        y = x.view(-1).to(torch.float32)  # a view and a no-op conversion: nothing launched
        buf.add_(y)  # in place: a kernel although its output is its input
        return (y * 2).t()  # one kernel, then a view

    trace, _ = trace_call(step, x, locate=False)
    assert [o.name for o in trace.ops if o.kernel] == ["add_", "mul"] and trace.kernels == 2 < len(trace.ops)


def test_compare_tells_state_replaced_from_state_updated_in_place():
    state = {"s": torch.zeros(4)}

    def replaced():
        state["s"] = state["s"] + 1  # a replay would read the buffer the capture saw, not this one

    def in_place():
        state["s"] += 1

    def grows():
        state["s"] = torch.cat([state["s"], state["s"][:1]])  # shapes change every step

    for step, differs in ((in_place, False), (replaced, True), (grows, True)):
        a, _ = trace_call(step)
        b, _ = trace_call(step)
        n, lines, per_line = compare(a, b)
        assert (n > 0) == differs, (step.__name__, lines)
        assert sum(per_line.values()) <= n


def test_temporaries_are_named_by_creation_not_address():
    w = torch.randn(8, 8)

    def step():
        h = w @ torch.ones(8)  # a new temporary each call, wherever the allocator puts it
        return torch.relu(h) + 1

    (a, _), (b, _) = trace_call(step), trace_call(step)
    assert compare(a, b)[0] == 0


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("name", [p for p in available() if p != "dense"] + ["dense"])
def test_runtime_decode_step_reads_nothing_back(llama, name, monkeypatch):
    """The Phase-I decode step on the reference route (the one CUDA runs) issues no host
    read-back and no op whose output shape depends on data, for every built-in policy."""
    monkeypatch.setattr(attention, "ROUTE", "reference")
    policy = make_policy(name) if name == "dense" else make_policy(name, sparsity=0.8)
    prefill = "dense" if policy.shares_dense_prefill("dense") else "sparse"
    ids = torch.randint(2, llama.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    audit = audit_decode(Engine(llama, policy, prefill=prefill), ids, locate=False)
    assert audit.syncs == [] and audit.dynamic == [], audit.summary()
    assert audit.ops_per_step > 0 and audit.ops_per_layer == audit.ops_per_step / llama.config.num_hidden_layers


@pytest.mark.parametrize("name", available())
def test_static_decode_step_is_replayable(llama, name, monkeypatch):
    """Engine(static=True): two consecutive decode steps issue the same ops with the same
    arguments on the same persistent buffers, with no read-back: what a CUDA graph replays."""
    monkeypatch.setattr(attention, "ROUTE", "reference")
    policy = make_policy(name) if name == "dense" else make_policy(name, sparsity=0.8)
    ids = torch.randint(2, llama.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    for prefill in ("sparse", "dense"):
        audit = audit_decode(Engine(llama, policy, prefill=prefill, static=True), ids)
        assert audit.replayable, audit.summary()
        eager = audit_decode(Engine(llama, policy, prefill=prefill), ids, locate=False)
        assert eager.n_differences > 0  # the eager step grows its slots: the audit tells the two apart


@pytest.mark.parametrize("name", available())
def test_static_step_with_host_and_deleted_keys_is_replayable(llama, name, monkeypatch):
    """With an offload plan (every non-local key on the host from the first step) and one that
    also deletes and recomputes (also with INT8 KV): the step, its tier moves included, issues
    the same ops on the same buffers with no read-back (state the schedule changes is updated in
    place: a captured step would read stale buffers otherwise)."""
    from alisa.runtime.tiered import Plan

    monkeypatch.setattr(attention, "ROUTE", "reference")
    policy = make_policy(name) if name == "dense" else make_policy(name, sparsity=0.8)
    ids = torch.randint(2, llama.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    for plan, int8 in ((Plan(alpha=1.0, p1=0), False), (Plan(alpha=0.7, beta=0.5, p1=0, p2=0), False),
                       (Plan(alpha=0.7, beta=0.5, p1=0, p2=0), True)):
        audit = audit_decode(Engine(llama, policy, prefill="sparse", static=True, plan=plan, int8=int8), ids)
        assert audit.replayable, (plan, int8, audit.summary())


def test_replayed_captures_again_when_the_step_changes(monkeypatch):
    """engine.Replayed (CUDA graphs, faked here): eager warm-up steps, one capture replayed, and
    when the cache's static key changes (host keys appear) one eager step, then a new capture; a
    failed capture is eager, its record names the step's error (not the one ending the capture
    raises over it), and the stream current before it is current again."""
    from alisa.runtime import engine as E

    class Graph:
        def __init__(self):
            self.fn = None

        def replay(self):
            calls.append("replay")

    class capture:
        def __init__(self, g):
            self.g = g

        def __enter__(self):
            calls.append("capture")
            capturing[0] = True

        def __exit__(self, *exc):
            capturing[0] = False
            if exc[0] is not None:  # as torch.cuda.graph: ending a capture the step broke raises its own error
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            return False

    class stream:  # torch.cuda.stream: the capture's stream is made current again however the capture ends
        def __init__(self, s):
            pass

        def __enter__(self):
            calls.append("stream")

        def __exit__(self, *exc):
            calls.append("stream back")
            return False

    calls, key, capturing = [], [0], [False]
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)

    def model(**kw):
        calls.append("eager")
        return "out"

    step = E.Replayed(model, key=lambda: key[0], warmup=2)
    for _ in range(4):
        step()
    assert calls == ["eager", "eager", "stream", "capture", "eager", "stream back", "replay", "replay"] and step.status == "captured"
    calls.clear()
    key[0] = 1
    step()
    step()
    step()
    assert calls == ["eager", "stream", "capture", "eager", "stream back", "replay", "replay"]
    assert step.status == "captured (2 graphs: the step changed 1x)"

    def broken(**kw):
        if capturing[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return model()

    calls.clear()
    step = E.Replayed(broken, warmup=0)
    step()
    step()
    assert calls == ["stream", "capture", "stream back", "eager", "eager"]
    assert step.status == "eager (capture failed: RuntimeError: operation not permitted when stream is capturing)"  # the step's error


def test_cli_bad_policy_is_one_line(capsys):
    assert main(["--policies", "nope"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "nope" in out[0]
    for argv, needle in ((["--model", "x"], "unrecognized arguments: --model x"), (["--lines", "-1"], "--lines=-1 is invalid")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
