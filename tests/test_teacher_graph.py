"""Distillation topologies (`codistill.graph`): who distils from whom, what each worker receives
and runs, through `Codistillation` in an own loop."""

from __future__ import annotations

import pytest
import torch

from mp_helpers import run_workers

from codistill.config import load_config
from codistill.errors import ConfigError
from codistill.teacher_graph import TeacherGraph

pytestmark = pytest.mark.timeout(300)

STEPS, T = 7, 3


def test_ring_teacher_sets_are_the_next_models():
    assert [TeacherGraph("ring", 3).teachers_of(i) for i in range(3)] == [[1], [2], [0]]
    assert [TeacherGraph("ring", 4).teachers_of(i, e) for e in (0, 5) for i in range(4)] == [[1], [2], [3], [0]] * 2
    assert [TeacherGraph("ring", 4, peers=2).teachers_of(i) for i in range(4)] == [[1, 2], [2, 3], [0, 3], [0, 1]]
    assert [TeacherGraph("ring", 4).students_of(i) for i in range(4)] == [[3], [0], [1], [2]]
    assert [TeacherGraph("all", 4).teachers_of(i) for i in range(4)] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert TeacherGraph("ring", 4).held_by(2) == [3] and TeacherGraph("random", 4).held_by(2) == [0, 1, 3]


def test_random_draws_are_reproducible_vary_by_exchange_and_never_self():
    g = TeacherGraph("random", 8, peers=2, seed=5)
    draws = [[g.teachers_of(i, e) for i in range(8)] for e in range(20)]
    assert draws == [[TeacherGraph("random", 8, peers=2, seed=5).teachers_of(i, e) for i in range(8)] for e in range(20)]
    assert all(len(d) == 2 and i not in d and d == sorted(set(d)) for row in draws for i, d in enumerate(row))
    assert len({tuple(map(tuple, row)) for row in draws}) == 20  # a new draw at every exchange
    assert draws[0] != [[TeacherGraph("random", 8, 2, seed=6).teachers_of(i, 0) for i in range(8)]]
    for e in range(20):  # senders know their receivers: students_of inverts teachers_of
        assert sorted((j, i) for i in range(8) for j in g.teachers_of(i, e)) == \
            sorted((j, i) for j in range(8) for i in g.students_of(j, e))


@pytest.mark.parametrize("sets, message", [
    (["codistill.graph=star"], "codistill.graph must be one of all, ring, random; got 'star'"),
    (["codistill.n_models=4", "codistill.graph=ring", "codistill.peers=4"], "codistill.peers must be in 1..3"),
    (["codistill.graph=random", "codistill.peers=0"], "codistill.peers must be in 1..1"),
    (["codistill.graph=random", "codistill.exchange=storage", "codistill.exchange_dir=/tmp/x",
      "codistill.model_index=0"], "codistill.graph=random needs codistill.exchange=collective"),
])
def test_bad_graph_settings_are_one_error(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, sets)


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def _state(module) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in module.state_dict().values()])


def _graph_worker(rank, world, n, graph, peers, delay=0, hierarchical=False):
    import codistill as cd

    codist = cd.Codistillation(_net, n_models=n, every=T, alpha=0.5, delay=delay, seed=3, graph=graph,
                               peers=peers, hierarchical=hierarchical)
    calls = []  # the teachers run this step, one entry per forward
    for j, m in codist.teachers.modules.items():
        m.register_forward_hook(lambda *_, j=j: calls.append(j))
    optimizer = torch.optim.SGD(codist.model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    own, teachers, forwards = [], [], []
    with codist.attach(optimizer):
        for _ in range(STEPS):
            x, y = torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g)
            own.append(_state(codist.module))
            calls.clear()
            losses = codist.loss(codist.model(x), y, teacher_inputs=x)
            forwards.append(torch.tensor(sorted(calls)))
            teachers.append({j: _state(codist.teachers.modules[j]) for j in sorted(codist.teachers.active)})
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()
    return {"own": own, "teachers": teachers, "forwards": forwards, "held": sorted(codist.teachers.modules),
            "counter": codist.counter.as_dict(), "state_bytes": codist.exchanger.send.nbytes,
            "final": _state(codist.module)}


def _check_graph_run(r, n, graph, peers, delay=0):
    """Every worker ran exactly its drawn teachers once per step, holding the drawn model's state
    from the exchange the schedule says; every replica of a model agrees."""
    replicas = len(r) // n
    g = TeacherGraph(graph, n, peers, seed=3)
    for rank, out in enumerate(r):
        model = rank // replicas
        assert out["held"] == g.held_by(model)
        for step in range(STEPS):
            started = step - step % T
            source = started if step - started >= delay or started == 0 else started - T
            expected = g.teachers_of(model, source // T)
            assert out["forwards"][step].tolist() == expected, (rank, step)
            assert sorted(out["teachers"][step]) == expected
            for j in expected:  # replica 0's state: it gives its BatchNorm statistics to its group before sending
                assert torch.equal(out["teachers"][step][j], r[j * replicas]["own"][source]), (rank, step, j)
            assert all(torch.equal(out["teachers"][step][j], r[model * replicas]["teachers"][step][j]) for j in expected)
        exchanges = range(0, STEPS, T)
        assert out["counter"]["exchanges"] == len(exchanges)
        assert out["counter"]["exchange_received"] == out["state_bytes"] * peers * len(exchanges)
        assert out["counter"]["exchange_sent"] == out["state_bytes"] * sum(
            len(g.students_of(model, e // T)) for e in exchanges)


def test_ring_of_four_runs_one_teacher_per_step_from_the_next_model(tmp_path):
    r = run_workers(_graph_worker, 4, tmp_path, (4, "ring", 1, 2))  # delay 2: background transfers too
    _check_graph_run(r, 4, "ring", 1, delay=2)


def test_random_peer_is_drawn_alike_on_every_replica_of_a_model(tmp_path):
    r = run_workers(_graph_worker, 6, tmp_path, (3, "random", 1))  # 3 models x 2 replicas
    _check_graph_run(r, 3, "random", 1)
    drawn = [[tuple(TeacherGraph("random", 3, 1, seed=3).teachers_of(m, e)) for m in range(3)] for e in range(3)]
    assert len(set(map(tuple, drawn))) > 1  # the draws changed between the run's exchanges


def test_ring_of_two_is_all_to_all_bitwise(tmp_path):
    ring = run_workers(_graph_worker, 2, tmp_path, (2, "ring", 1))
    full = run_workers(_graph_worker, 2, tmp_path, (2, "all", 1))
    for a, b in zip(ring, full):
        assert torch.equal(a["final"], b["final"]) and a["counter"] == b["counter"]
        assert all(torch.equal(x, y) for x, y in zip(a["own"], b["own"]))
