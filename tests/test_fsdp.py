"""Sharded model groups (train.parallel=fsdp): the same training as DDP, 1/k of the exchange bytes,
checkpoints that resume at another number of workers per model."""

from __future__ import annotations

import pytest
import torch

from mp_helpers import run_workers

pytestmark = pytest.mark.timeout(600)


def _full_state(module) -> dict:
    """The whole model's state on every rank (a sharded one gathered)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def _twins(rank, world, cfgs, run_dir):
    """Train each config in turn on the same processes; each run's summary and final weights."""
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    out = []
    for i, cfg in enumerate(cfgs):
        tr = Trainer(cfg, ctx, None if run_dir is None else f"{run_dir}/{i}")
        summary = tr.fit()
        out.append({"summary": summary, "state": _full_state(tr.codist.module),
                    "counter": tr.counter.as_dict()})
    return out


def _digits_sets():
    return ["data.name=digits", "data.batch_size=16", "data.val_fraction=0.1", "model.name=cnn_tiny",
            "schedule.name=constant", "schedule.warmup_epochs=0", "schedule.milestones=[]",
            "optim.lr=0.05", "optim.weight_decay=0.0005", "schedule.scale_lr=false",
            "train.progress=false", "train.log_every=4", "dist.threads=1", "train.steps=12",
            "train.eval_every=0", "codistill.alpha_schedule=constant", "codistill.alpha_steps=0",
            "codistill.exchange_every=4"]


ARMS = {
    "codistill": ["codistill.n_models=2"],
    "codistill_async_bf16": ["codistill.n_models=2", "codistill.exchange_delay=2", "codistill.exchange_dtype=bf16"],
    "allreduce": ["codistill.n_models=1"],
    "diloco": ["codistill.n_models=2", "codistill.method=diloco"],
    "localsgd": ["codistill.n_models=2", "codistill.method=localsgd", "codistill.exchange_hierarchical=true"],
}


def _buffer_share(state: dict, wire_fp32_bytes: int, floating_only: bool) -> float:
    """Of one model's exchanged bytes, the fraction in buffers (BatchNorm statistics, not sharded);
    DiLoCo and local SGD average the floating-point tensors only."""
    state = {k: v for k, v in state.items() if v.is_floating_point() or not floating_only}
    size = lambda v: v.numel() * (wire_fp32_bytes if v.dtype == torch.float32 else v.element_size())  # noqa: E731
    buffers = sum(size(v) for k, v in state.items() if "running" in k or "num_batches" in k)
    return buffers / sum(size(v) for v in state.values())


def test_sharded_runs_match_their_ddp_twins_on_digits(tmp_path):
    """Every arm, 2 models x 2 workers (all-reduce: 1 x 4): the same losses and final weights and
    buffers as DDP, and the exchange bytes per worker of DDP / k for the sharded parameters."""
    from codistill.config import load_config

    cfgs = []
    for sets in ARMS.values():
        sets = [*_digits_sets(), *sets]
        cfgs += [load_config(None, sets), load_config(None, [*sets, "train.parallel=fsdp"])]
    runs = run_workers(_twins, 4, tmp_path, (cfgs, None), timeout=500)
    for a, (arm, sets) in enumerate(ARMS.items()):
        ddp, fsdp = [r[2 * a] for r in runs], [r[2 * a + 1] for r in runs]
        d, f = ddp[0]["summary"], fsdp[0]["summary"]
        for md, mf in zip(d["models"], f["models"]):
            assert mf["train_loss"] == pytest.approx(md["train_loss"], rel=1e-4, abs=1e-5), arm
            assert mf["val_loss"] == pytest.approx(md["val_loss"], rel=1e-4, abs=1e-5), arm
            assert mf["param_distance"] == pytest.approx(md["param_distance"], rel=1e-4), arm
        bad = [(arm, r, k) for r, (rd, rf) in enumerate(zip(ddp, fsdp)) for k, v in rd["state"].items()
               if not torch.allclose(rf["state"][k].float(), v.float(), rtol=1e-4, atol=1e-5)]
        assert not bad  # every worker ends with its DDP twin's weights and buffers
        # Bytes: the parameters' part of the exchange / k, the buffers' as DDP (k = 2); FSDP's
        # gathers + reduce-scatters of this root-only model cost what DDP's all-reduce does.
        share = _buffer_share(ddp[0]["state"], 2 if "bf16" in arm else 4, "method" in " ".join(sets))
        de, fe = d["bytes_per_worker"]["exchange"], f["bytes_per_worker"]["exchange"]
        # Hierarchical DDP sends over replica 0's column only (half the workers here); sharded, every
        # column sends its own shard (which crosses between groups once all the same).
        hierarchical = 2 if "codistill.exchange_hierarchical=true" in sets else 1
        assert fe == pytest.approx(hierarchical * de * ((1 - share) / 2 + share), rel=1e-12), arm
        assert (fe > 0) == (arm != "allreduce") and f["exchanges"] == d["exchanges"]
        # In-group traffic: DDP's all-reduce, or FSDP's gathers + reduce-scatters (for this root-only
        # model the same bytes) plus each teacher's gather for its forward, one per step here.
        params = sum(v.numel() * 4 for k, v in ddp[0]["state"].items() if "running" not in k and "num_b" not in k)
        teachers = 12 * params / 2 if arm.startswith("codistill") else 0
        assert f["bytes_per_worker"]["allreduce"] == d["bytes_per_worker"]["allreduce"] + teachers > 0, arm


def _resume(rank, world, cfgs, run_dir):
    """Resume `run_dir` with each config in turn; a config that cannot resume gives its error."""
    from codistill.checkpoint import CheckpointError
    from codistill.distributed import DistContext
    from codistill.trainer import Trainer

    ctx = DistContext(rank, world, rank, "gloo", torch.device("cpu"))
    out = []
    for cfg in cfgs:
        try:
            tr = Trainer(cfg, ctx, run_dir, resume=True)
        except CheckpointError as e:
            out.append({"error": str(e)})
            continue
        out.append({"summary": tr.fit(), "state": _full_state(tr.codist.module)})
    return out


def test_sharded_checkpoint_resumes_at_another_number_of_workers_per_model(tmp_path):
    """Trained 2 x 2 to step 6, resumed 2 x 1 with the same model batch to step 12: the weights of
    the uninterrupted 2 x 2 run (up to reduction order); with another model batch, an error. An MLP:
    BatchNorm's statistics over 16 or 32 examples would differ, so only a model without it can match."""
    from codistill.config import load_config

    sets = [*_digits_sets(), "codistill.n_models=2", "train.parallel=fsdp", "model.name=mlp",
            "train.log_every=6"]
    # The uninterrupted run is DDP's twin (same weights up to reduction order; its checkpoint is
    # DDP's, for the export test below).
    whole = load_config(None, [s for s in sets if s != "train.parallel=fsdp"])
    first = load_config(None, [*sets, "train.steps=6"])
    run = tmp_path / "run"
    uninterrupted = [r[0] for r in run_workers(_twins, 4, tmp_path, ([whole, first], str(run)), timeout=400)]
    saved = run / "1"
    assert sorted(p.name for p in (saved / "checkpoints/step_000006/model_0").iterdir())[0] == ".metadata"
    other_batch = load_config(None, [*sets, "data.batch_size=16"])
    same_batch = load_config(None, [*sets, "data.batch_size=32"])
    resumed = run_workers(_resume, 2, tmp_path, ([other_batch, same_batch], str(saved)), timeout=400)
    assert "data.batch_size=32" in resumed[0][0]["error"]
    for r_new, r_old in ((0, 0), (1, 2)):
        ref = uninterrupted[r_old]["state"]  # ranks 0 and 2 of the 2 x 2 run: models 0 and 1
        got = resumed[r_new][1]["state"]
        for k, v in ref.items():
            torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)
    assert resumed[0][1]["summary"]["steps"] == 12
    from codistill.config import dump_yaml

    (run / "0/config.yaml").write_text(dump_yaml(whole))  # as `codistill train` writes it
    (saved / "config.yaml").write_text(dump_yaml(first))
    _check_export(run / "0", "ddp")
    _check_export(saved, "sharded")


def _check_export(run_dir, kind):
    """`codistill export` of model 1 and of the ensemble: they load strictly with build_model alone
    and score on the test split what the run's summary says."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from codistill.cli import main
    from codistill.config import load_config
    from codistill.export import load_exported
    from codistill.models import build_model
    from codistill.tasks import make_task
    from codistill.topology import Grid, Topology

    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["export", str(run_dir), "--model", "1"]) == 0
    path = run_dir / "export/model_1.safetensors"
    with safe_open(str(path), "pt") as f:  # without codistill's loader: build_model + strict load
        spec = json.loads(f.metadata()["codistill"])["models"][0]
    plain = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["options"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    assert main(["export", str(run_dir), "--ensemble", "--out", str(run_dir / "ens.safetensors")]) == 0
    task = make_task(load_config(run_dir / "config.yaml"), torch.device("cpu"))
    alone = Topology(Grid(1, 1), 0, None, None)  # one model, one worker: no process group
    score = lambda m: task.evaluate(m.eval(), "test", alone)["models"][0]  # noqa: E731
    assert score(plain)["accuracy"] == summary["models"][1]["test_accuracy"], kind
    assert score(plain)["loss"] == pytest.approx(summary["models"][1]["test_loss"], rel=1e-5), kind
    ens = score(load_exported(run_dir / "ens.safetensors"))
    assert ens["accuracy"] == summary["ensemble_test_accuracy"], kind
    assert ens["loss"] == pytest.approx(summary["ensemble_test_loss"], rel=1e-5), kind
    assert main(["export", str(run_dir), "--model", "2"]) == 2  # bad input: one line, nothing written
    assert not (run_dir / "export/model_2.safetensors").exists()


def test_sharded_gpt_matches_its_ddp_twin_and_exchanges_half_the_bytes(tmp_path):
    """gpt_tiny (Transformer blocks sharded one by one, tied embeddings, dropout), 2 models x 2
    workers: DDP's losses and weights, and exactly half DDP's exchange bytes per worker (no buffers)."""
    from test_lm import lm_config, write_text

    from codistill.lm.task import LMTask

    # SGD: Adam's normalized update would turn reduction-order noise in near-zero gradients into
    # differences of the order of its learning rate.
    sets = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9",
            "codistill.n_models=2", "codistill.exchange_every=3", "train.steps=6", "train.eval_every=0",
            "codistill.alpha_schedule=constant", "codistill.alpha_steps=0", "lm.sample_tokens=0"]
    corpus = write_text(tmp_path / "text"), tmp_path / "cache"
    ddp = lm_config(*corpus, *sets)
    LMTask.prepare(ddp, tmp_path)
    runs = run_workers(_twins, 4, tmp_path, ([ddp, lm_config(*corpus, *sets, "train.parallel=fsdp")], None),
                       timeout=500)
    d, f = runs[0][0]["summary"], runs[0][1]["summary"]
    for md, mf in zip(d["models"], f["models"]):
        assert mf["train_loss"] == pytest.approx(md["train_loss"], rel=1e-4)
        assert mf["val_loss"] == pytest.approx(md["val_loss"], rel=1e-4)
    for r in runs:
        for k, v in r[0]["state"].items():
            torch.testing.assert_close(r[1]["state"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert f["bytes_per_worker"]["exchange"] == d["bytes_per_worker"]["exchange"] / 2 > 0


def _sharded_teacher(rank, world):
    """A sharded teacher bound to its flat buffer (uneven rows: FSDP pads rank 1's shard)."""
    import torch.distributed as dist
    import torch.nn as nn

    from codistill.exchange import Teachers
    from torch.distributed.device_mesh import DeviceMesh

    from codistill.sharding import local, shard_model

    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # the whole world is the model's group
    build = lambda seed: (torch.manual_seed(seed), nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))[1]  # noqa: E731
    student, teacher = shard_model(build(0), mesh), shard_model(build(1), mesh)
    teachers = Teachers({1: teacher})
    flat = teachers.flats[1]
    aliased = all(local(p).untyped_storage().data_ptr() == flat.buffers[torch.float32].untyped_storage().data_ptr()
                  for p in teacher.parameters())
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    teachers.mark_received(0)
    before = teachers.logits(x)[0]  # FSDP's lazy init, and a gathered root it must not keep
    flat.pack(student)  # what the exchange's receive does: write the shards into the flat buffer
    with torch.no_grad():
        return {"aliased": aliased, "flat_numel": flat.buffers[torch.float32].numel(), "before": before,
                "teacher": teachers.logits(x)[0], "student": student(x)}


def test_a_sharded_teacher_lives_in_its_receive_buffer(tmp_path):
    """A sharded teacher costs 1/k of a model, not 2/k: FSDP keeps its shards in the flat buffer
    the exchange receives into, so receiving updates the teacher with no copy and no second buffer."""
    for rank, r in enumerate(run_workers(_sharded_teacher, 2, tmp_path, timeout=300)):
        assert r["aliased"], rank
        # Slots padded as FSDP pads: rows ceil(5 / 2) = 3 and ceil(3 / 2) = 2 on both ranks.
        assert r["flat_numel"] == 3 * 4 + 3 + 2 * 5 + 2
        assert not torch.equal(r["before"], r["student"])
        torch.testing.assert_close(r["teacher"], r["student"], rtol=0, atol=0)


def test_a_sharded_language_model_run_ends_with_its_sample(tmp_path):
    """The run's last act, model 0's first worker sampling alone into sample.txt, with the model
    sharded over 2 workers: the model is gathered on both first (a sharded forward alone would wait
    for its peer, which had left: `codistill train --config configs/lm_tiny.yaml --set
    train.parallel=fsdp` ended 'a peer died' after its summary). The sample is DDP's twin's."""
    from test_lm import lm_config, write_text

    from codistill.lm.task import LMTask

    sets = ["optim.name=sgd", "optim.lr=0.1", "codistill.n_models=1", "train.steps=2", "train.eval_every=0",
            "lm.sample_tokens=12"]
    corpus = write_text(tmp_path / "text"), tmp_path / "cache"
    ddp = lm_config(*corpus, *sets)
    LMTask.prepare(ddp, tmp_path)
    run_workers(_twins, 2, tmp_path, ([ddp, lm_config(*corpus, *sets, "train.parallel=fsdp")], str(tmp_path / "run")),
                timeout=300)
    sample = (tmp_path / "run/1/sample.txt").read_text()
    assert "# continuation:" in sample and sample == (tmp_path / "run/0/sample.txt").read_text()


def test_an_export_with_batchnorm_scores_what_the_summary_says(tmp_path):
    """cnn_tiny (BatchNorm) 2 models x 2 workers, sharded: after the last step each worker's running
    statistics come from its own batch; the checkpoint (and so the export) holds replica 0's, and the
    final evaluation must score that model, not each worker's statistics on its share of the split
    (`codistill export` of digits_tiny with train.parallel=fsdp scored 80.50% against the
    summary's 80.78%)."""
    from codistill.config import dump_yaml, load_config

    cfg = load_config(None, [*_digits_sets(), *ARMS["codistill"], "train.parallel=fsdp", "train.steps=6"])
    run = tmp_path / "run"
    run_workers(_twins, 4, tmp_path, ([cfg], str(run)), timeout=300)
    (run / "0/config.yaml").write_text(dump_yaml(cfg))  # as `codistill train` writes it
    _check_export(run / "0", "sharded, BatchNorm")
