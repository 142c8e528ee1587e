"""The rank grid and config loading/validation."""

import pytest

from codistill.config import check_world_size, load_config
from codistill.errors import ConfigError
from codistill.topology import Grid


def test_grid_rows_are_models_and_columns_are_exchange_groups():
    g = Grid(world_size=6, n_models=3)
    assert g.replicas == 2
    assert [g.coords(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert g.model_ranks(1) == [2, 3]
    assert g.exchange_ranks(0) == [0, 2, 4] and g.exchange_ranks(1) == [1, 3, 5]
    assert all(g.rank(*g.coords(r)) == r for r in range(6))


def test_all_reduce_is_one_row():
    g = Grid(world_size=4, n_models=1)
    assert g.model_ranks(0) == [0, 1, 2, 3]
    assert [g.exchange_ranks(r) for r in range(4)] == [[0], [1], [2], [3]]


def test_model_seeds_never_collide_across_run_seeds():
    import numpy as np

    from codistill.topology import model_seed

    # Once seed + model: model 1 of train.seed=0 was model 0 of train.seed=1.
    assert model_seed(0, 1) != model_seed(1, 0)
    seeds = {model_seed(s, m) for s in range(200) for m in range(16)}
    assert len(seeds) == 200 * 16
    # numpy's independent child streams, SeedSequence(seed).spawn(n)[model], as 63 bits.
    low, high = np.random.SeedSequence(7).spawn(3)[2].generate_state(2, np.uint32)
    assert model_seed(7, 2) == int(low) | (int(high) & 0x7FFF_FFFF) << 32 < 2**63


def test_grid_rejects_indivisible_world():
    with pytest.raises(ValueError, match="not divisible"):
        Grid(world_size=5, n_models=2)


def test_defaults_are_the_fashion_mnist_cnn_on_2x2():
    cfg = load_config()
    assert (cfg.data.name, cfg.model.name, cfg.codistill.n_models, cfg.dist.nproc) == ("fashion_mnist", "cnn", 2, 4)
    assert cfg.mode == "codistill"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.3\n  weight_decay: 1.0e-4\ncodistill:\n  n_models: 4\n")
    cfg = load_config(f, ["optim.lr=0.5", "model.name=[cnn, mlp, cnn, mlp]"])
    assert cfg.optim.lr == 0.5 and cfg.optim.weight_decay == 1e-4 and cfg.codistill.n_models == 4
    assert cfg.model_names() == ["cnn", "mlp", "cnn", "mlp"]


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=0.1"], "unknown config key optim.lrr"),
    (["optimizer.lr=0.1"], "unknown config section 'optimizer'"),
    (["optim.lr=fast"], "optim.lr must be float"),
    (["codistill.n_models=2.5"], "codistill.n_models must be int"),
    (["codistill.exchange_every=0"], "codistill.exchange_every must be > 0"),
    (["codistill.exchange_every=-5"], "codistill.exchange_every must be > 0"),
    (["codistill.alpha=-1"], "codistill.alpha must be >= 0"),
    (["codistill.loss=l1"], "codistill.loss must be one of kl, mse, ce"),
    (["optim.weight_decay=[1e-4, 0]"], "optim.weight_decay has 2 stages"),
    (["train.progress=maybe"], "train.progress must be bool"),
    (["model.name=[cnn, mlp, cnn]"], "model.name lists 3 models"),
    (["codistill.exchange_delay=60"], "exchange_delay must be <="),
    (["codistill.exchange_dtype=int8"], "codistill.exchange_dtype must be one of fp32, bf16, fp16"),
    (["codistill.exchange_dtype=bf16", "codistill.exchange=storage", "codistill.exchange_dir=x",
      "codistill.model_index=0"], "exchange_dtype applies to exchange=collective only"),
    (["codistill.exchange_dtype=bf16", "codistill.method=diloco"], "averages in fp32"),
    (["codistill.exchange_hierarchical=true", "codistill.exchange=storage", "codistill.exchange_dir=x",
      "codistill.model_index=0"], "exchange_hierarchical applies to exchange=collective only"),
    (["lr=0.1"], "must be section.key"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["model.name=resnet9000"], "unknown model 'resnet9000'"),
    (["data.name=imagenet21k"], "unknown dataset 'imagenet21k'"),
])
def test_unknown_names_are_refused_by_the_registries(overrides, message):
    from codistill.tasks import check_names

    cfg = load_config(None, overrides)  # config.py knows fields, not the registries above it
    with pytest.raises(ConfigError, match=message):
        check_names(cfg)


def test_world_size_must_divide(tmp_path):
    cfg = load_config()
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match="world size 3 is not divisible by codistill.n_models=2"):
        check_world_size(cfg, 3)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
