"""Multi-process invariants of codistillation on CPU with gloo (2 models x 2 replicas)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mp_helpers import digits_config, run_workers

pytestmark = pytest.mark.timeout(300)

STEPS, T = 7, 3


def _params(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _flat_state(module) -> dict[str, torch.Tensor]:
    from codistill.flat import FlatState

    flat = FlatState(module)
    flat.pack(module)
    return {str(dt): b.clone() for dt, b in flat.buffers.items()}


def _codistill_worker(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    batches, _ = tr.task.train_batches(tr.topo, tr.seed)
    own, teachers, params = [], [], []
    for _ in range(STEPS):
        tr.maybe_exchange()
        own.append(_flat_state(tr.model))  # state after `step` updates, before this step
        params.append(_params(tr.model))
        teachers.append({j: {str(dt): b.clone() for dt, b in f.buffers.items()}
                         for j, f in tr.teachers.flats.items()})
        tr.train_step(next(batches))
    grad_bytes = sum(p.numel() * p.element_size() for p in tr.model.parameters())
    state_bytes = tr.exchanger.send.nbytes
    return {"model": tr.topo.model_index, "own": own, "teachers": teachers, "params": params,
            "counter": tr.counter.as_dict(), "grad_bytes": grad_bytes, "state_bytes": state_bytes}


@pytest.fixture(scope="module")
def codistill_run(tmp_path_factory):
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=T, train__steps=STEPS)
    return run_workers(_codistill_worker, 4, tmp_path_factory.mktemp("codistill"), (cfg,))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_replicas_of_a_model_stay_bitwise_identical(codistill_run):
    r = codistill_run  # ranks 0, 1 = model 0; ranks 2, 3 = model 1
    for step in range(STEPS):
        assert torch.equal(r[0]["params"][step], r[1]["params"][step])
        assert torch.equal(r[2]["params"][step], r[3]["params"][step])
        # Buffers too at exchanges (DDP lets BatchNorm statistics drift in between; the exchange
        # syncs them), so every worker of a model holds identical teachers at every step.
        if step % T == 0:
            assert _equal(r[0]["own"][step], r[1]["own"][step])
            assert _equal(r[2]["own"][step], r[3]["own"][step])
        assert _equal(r[0]["teachers"][step][1], r[1]["teachers"][step][1])
        assert _equal(r[2]["teachers"][step][0], r[3]["teachers"][step][0])


@pytest.fixture(scope="module")
def independent_run(tmp_path_factory):
    """The same run with alpha = 0: same seeds, same data order, no distillation term."""
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=T, train__steps=STEPS,
                        codistill__alpha=0.0)
    return run_workers(_codistill_worker, 4, tmp_path_factory.mktemp("independent"), (cfg,))


def test_distillation_changes_every_update(codistill_run, independent_run):
    r, alone = codistill_run, independent_run
    for rank in (0, 2):  # one worker of each model
        assert torch.equal(r[rank]["params"][0], alone[rank]["params"][0])  # same initialization
        for step in range(1, STEPS):  # teachers from the exchange at step 0 on: every update differs
            assert not torch.equal(r[rank]["params"][step], alone[rank]["params"][step]), (rank, step)
    assert not torch.equal(r[0]["params"][1], r[2]["params"][1])  # and the models differ from each other


def test_teacher_equals_peer_state_right_after_exchange_and_is_frozen_between(codistill_run):
    r = codistill_run
    for rank, peer_rank, j in ((0, 2, 1), (1, 3, 1), (2, 0, 0), (3, 1, 0)):
        for step in range(STEPS):
            last_exchange = step - step % T
            # Parameters and buffers (BatchNorm running statistics, num_batches_tracked) exactly.
            assert _equal(r[rank]["teachers"][step][j], r[peer_rank]["own"][last_exchange]), (rank, step)
    # BatchNorm buffers really moved, so the check above covers them with changing values.
    assert not torch.equal(r[0]["own"][0]["torch.int64"], r[0]["own"][T]["torch.int64"])


def test_byte_counters_equal_analytic_values(codistill_run):
    from codistill.accounting import analytic_allreduce_bytes

    for res in codistill_run:
        c = res["counter"]
        exchanges = len(range(0, STEPS, T))
        assert c["exchanges"] == exchanges
        assert c["allreduce_sent"] == pytest.approx(analytic_allreduce_bytes(res["grad_bytes"], 2, STEPS), rel=1e-12)
        assert c["exchange_sent"] == (2 - 1) * res["state_bytes"] * exchanges
        assert c["exchange_received"] == res["state_bytes"] * exchanges  # same architecture both sides


def _delayed_worker(rank, world, cfg):
    return _codistill_worker(rank, world, cfg)


def test_delayed_exchange_swaps_in_exactly_delay_steps_later(tmp_path):
    delay = 2
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=T,
                        codistill__exchange_delay=delay, train__steps=STEPS)
    r = run_workers(_delayed_worker, 4, tmp_path, (cfg,))
    for rank, peer_rank, j in ((0, 2, 1), (3, 1, 0)):
        for step in range(STEPS):
            started = step - step % T
            source = started if step - started >= delay or started == 0 else started - T
            assert _equal(r[rank]["teachers"][step][j], r[peer_rank]["own"][source]), (rank, step)


def _allreduce_vs_ddp_worker(rank, world, cfg):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    ref = DDP(copy.deepcopy(tr.model))  # plain torch: default group, default all-reduce
    o = cfg.optim
    opt = torch.optim.SGD(ref.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    batches, _ = tr.task.train_batches(tr.topo, tr.seed)
    mismatches = []
    for step in range(STEPS):
        x, y = next(batches)
        tr.train_step((x, y))
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
        same = all(torch.equal(a, b) for a, b in zip(tr.model.parameters(), ref.module.parameters()))
        mismatches.append(0 if same else 1)
    return torch.tensor(mismatches)


def test_one_model_matches_plain_ddp_step_for_step(tmp_path):
    cfg = digits_config(codistill__n_models=1, train__steps=STEPS)
    results = run_workers(_allreduce_vs_ddp_worker, 4, tmp_path, (cfg,))
    for mismatches in results:
        assert mismatches.sum() == 0, mismatches


def _final_params_worker(rank, world, cfg):
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    tr = Trainer(cfg, ctx, None)
    tr.fit()
    return {"model": tr.topo.model_index, "state": _flat_state(tr.model)}


def test_alpha_zero_matches_independent_training(tmp_path):
    steps = 6
    joint = run_workers(_final_params_worker, 4, tmp_path,
                        (digits_config(codistill__n_models=2, codistill__alpha=0.0, train__steps=steps),))
    for model in (0, 1):
        # The same model alone: model `model` of the same run (its seed, data order) trained as its own job
        # on 2 workers (exchange=storage), with no peer ever publishing.
        alone = run_workers(_final_params_worker, 2, tmp_path,
                            (digits_config(codistill__n_models=2, codistill__alpha=0.0, train__steps=steps,
                                           codistill__exchange="storage", codistill__model_index=model,
                                           codistill__exchange_dir=str(tmp_path / f"alone{model}")),))
        assert _equal(alone[0]["state"], joint[2 * model]["state"]), model


def test_hierarchical_exchange_gives_every_replica_the_same_teachers_over_one_column(tmp_path, codistill_run):
    # Asynchronous (D = 2): the transfer lands in staging on replica 0, and reaches replica 1 from
    # replica 0 when it is swapped in.
    delay = 2
    cfg = digits_config(codistill__n_models=2, codistill__exchange_every=T, codistill__exchange_delay=delay,
                        codistill__exchange_hierarchical=True, train__steps=STEPS)
    r = run_workers(_codistill_worker, 4, tmp_path, (cfg,))
    for rank, peer_rank, j in ((0, 2, 1), (1, 3, 1), (2, 0, 0), (3, 1, 0)):
        for step in range(STEPS):
            started = step - step % T
            source = started if step - started >= delay or started == 0 else started - T
            assert _equal(r[rank]["teachers"][step][j], r[peer_rank]["own"][source]), (rank, step)
    exchanges = len(range(0, STEPS, T))
    for rank in range(4):
        c, full = r[rank]["counter"], codistill_run[rank]["counter"]
        assert c["exchanges"] == exchanges
        if rank % 2 == 0:  # replica 0 of each model: the only cross-group traffic, as much as before
            assert c["exchange_sent"] == full["exchange_sent"] and c["exchange_received"] == full["exchange_received"]
            # One teacher per completed transfer (the one started at step 6 is still in flight),
            # broadcast to the 1 other replica.
            completed = len([s for s in range(0, STEPS, T) if s == 0 or s + delay < STEPS])
            teachers = r[rank]["state_bytes"] * completed
            assert c["buffer_sync_sent"] == full["buffer_sync_sent"] + teachers
        else:
            assert c["exchange_sent"] == c["exchange_received"] == 0

