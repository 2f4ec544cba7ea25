"""Every config mistake is one line naming the key and the value, exit code 2."""

import re
import subprocess
import sys

import pytest
import torch

from distcluster import config
from distcluster.commands.train import config_from_args, main, resizes
from distcluster.common.errors import ConfigError


def test_every_packaged_recipe_loads_and_validates():
    for name in config.recipe_names():
        config.from_dict(config.load_recipe(name)).validate()


def test_flags_and_overrides_apply_in_order():
    cfg = config_from_args(["--objective", "crlc", "--epochs", "3", "--set", "epochs=5",
                            "--set", "optim.lr=0.01", "--set", "crlc.temperature=0.2"])
    assert (cfg.objective, cfg.epochs, cfg.optim.lr, cfg.crlc.temperature) == ("crlc", 5, 0.01, 0.2)
    assert cfg.model.backbone == "small_cnn"  # the digits-crlc recipe


@pytest.mark.parametrize("written, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("-2.5e+2", -250.0),
                                            (".5e-1", 0.05), ("1.0e-4", 1e-4), ("0.01", 0.01)])
def test_numbers_in_exponent_form_are_numbers_without_a_dot_too(written, value):
    """YAML 1.1 reads 1e-3 as a string; `--set optim.lr=1e-3`, recipes and tune spaces take it as 0.001."""
    assert config_from_args(["--set", f"optim.lr={written}"]).optim.lr == value
    assert config.safe_yaml(f"lr: [{written}]", "test") == {"lr": [value]}
    assert config.safe_yaml("1e", "test") == "1e"  # not a number: stays a string


def test_set_indexes_lists_as_tune_spaces_do():
    cfg = config_from_args(["--set", "augment.crops.1.size=5", "--set", "augment.crops.0.count=3"])
    assert (cfg.augment.crops[1].size, cfg.augment.crops[0].count) == (5, 3)
    assert cfg.augment.crops[0].size == 8  # the rest of the digits recipe's groups stays


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("bogus=1", "bogus"),
    ("augment.crops=[{count: 2, size: 8, scales: [0.5, 1]}]", "augment.crops[0].scales"),
])
def test_unknown_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*unknown"):
        config_from_args(["--set", override])


@pytest.mark.parametrize("override, key", [
    ("clusters=1", "clusters"),
    ("imc_swav.temperature=0", "imc_swav.temperature"),
    ("crlc.temperature=-1", "crlc.temperature"),
    ("optim.lr=0", "optim.lr"),
    ("augment.flip=1.5", "augment.flip"),
    ("augment.crops=[{count: 2, size: 8, scale: [0.9, 0.1]}]", "augment.crops[0].scale"),
    ("epochs=ten", "epochs"),
    ("objective=kmeans", "objective"),
    ("optim.momentum=-1", "optim.momentum"),
    ("optim.momentum=1", "optim.momentum"),
    ("experiment=' '", "experiment"),
    ("augment.crops=[]", "augment.crops"),
])
def test_impossible_values_are_named(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        config_from_args(["--set", override]).validate()


def test_a_worker_range_is_an_elastic_group_from_the_flag_a_set_or_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("workers: 2-6\nbatch_size: 120\n")
    for argv in (["--workers", "2-6", "--batch-size", "120"], ["--set", "workers=2-6", "--batch-size", "120"],
                 ["--config", str(recipe)]):
        cfg = config_from_args(argv).validate()
        assert (cfg.min_workers, cfg.workers, cfg.elastic, cfg.group_sizes()) == (2, 6, True, [2, 3, 4, 5, 6])
    fixed = config_from_args(["--workers", "3", "--batch-size", "120"]).validate()
    assert (fixed.elastic, fixed.group_sizes()) == (False, [3])
    assert config_from_args(["--workers", "2-2"]).validate().group_sizes() == [2]  # MIN = MAX: fixed


def test_a_tune_space_searches_worker_ranges_like_any_key(tmp_path):
    from distcluster.cluster.search_space import load_space

    path = tmp_path / "space.yaml"
    path.write_text("base: digits-imc-swav\nset: {batch_size: 120}\n"
                    "space: {workers: {choice: ['1-2', '2-4']}}\n")
    space = load_space(str(path))
    assert [(c.min_workers, c.workers) for c in space.extreme_configs()][1:] == [(1, 2), (2, 4)]
    assert space.trial_config({"workers": "2-4"}).group_sizes() == [2, 3, 4]


@pytest.mark.parametrize("argv, key, reason", [
    (["--workers", "1-3", "--batch-size", "128"], "batch_size", "must be divisible by 3 workers"),
    (["--workers", "3-1"], "workers", "1 <= MIN <= MAX"),
    (["--workers", "0-2"], "workers", "1 <= MIN <= MAX"),
    (["--workers", "two"], "workers", "a whole number or MIN-MAX"),
    (["--workers", "1-2", "--set", "resize_check_seconds=0"], "resize_check_seconds", "> 0"),
    (["--set", "min_workers=1"], "min_workers", "unknown config key"),
])
def test_an_impossible_worker_range_is_named(argv, key, reason):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(reason)):
        config_from_args(argv).validate()


def test_resizes_are_the_starts_that_changed_the_group_size():
    starts = [{"time": 0.0, "epoch": 0, "workers": 2}, {"time": 60.0, "epoch": 3, "workers": 2},
              {"time": 90.0, "epoch": 5, "workers": 1}, {"time": 150.0, "epoch": 9, "workers": 2}]
    assert resizes(starts) == [
        {"time": "1970-01-01T00:01:30+00:00", "epoch": 5, "from": 2, "to": 1},
        {"time": "1970-01-01T00:02:30+00:00", "epoch": 9, "from": 1, "to": 2}]
    assert resizes(starts[:2]) == []  # a restart at the same size is no resize


def test_an_elastic_group_gets_whole_cpus_and_a_warning_only_when_its_smallest_size_cannot_start():
    from distcluster.cluster.ray_train import cpus_per_worker, warn_if_oversubscribed

    said = []
    elastic = config.from_dict({"workers": "2-8", "batch_size": 840})
    assert cpus_per_worker(elastic, {"CPU": 16.0}) == 2.0  # whole CPUs: 8 workers fit on 16
    assert cpus_per_worker(elastic, {"CPU": 4.0}) == 1.0  # never a fraction
    assert cpus_per_worker(config.Config(workers=2), {"CPU": 2.0}) == 0.75  # fixed groups share
    warn_if_oversubscribed(elastic, {"CPU": 4.0}, said.append)  # 8 workers, but 2 fit: no warning
    warn_if_oversubscribed(elastic, {"CPU": 1.0}, said.append)
    assert said == ["warning: the smallest group, 2 workers, needs 2 CPUs and the cluster has 1: "
                    "training waits until nodes join"]


def test_ray_processes_get_the_forwarded_settings_a_submitted_job_does_not_set_itself():
    import json

    from distcluster.cluster.ray_train import ray_env

    users = {"DISTCLUSTER_CACHE": "/c", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    assert ray_env({**users, "HOME": "/root"}) == users
    job = {"runtime_env": {"env_vars": {"DISTCLUSTER_CACHE": "/c"}}}  # ray job submit --runtime-env-json
    submitted = ray_env({**users, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)})
    assert submitted == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def test_the_controller_polls_every_quarter_second_unless_the_user_chose():
    from distcluster.cluster.ray_train import ray_env, use_fast_controller_poll
    from distcluster.common.errors import UserError

    for environ, expected in (({}, "0.25"), ({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}, "2")):
        use_fast_controller_poll(environ)
        assert ray_env(environ) == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": expected}  # to every Ray process
    for bad in ("soon", "0", "-1", "inf"):
        with pytest.raises(UserError, match=f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S must be .* got '{bad}'"):
            use_fast_controller_poll({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": bad})


def test_crop_larger_than_the_image_is_refused():
    cfg = config_from_args(["--set", "augment.crops=[{count: 2, size: 12}]"])
    with pytest.raises(ConfigError, match=r"augment.crops\[0\].size.*larger than the 8 px"):
        cfg.validate(image_size=8)


@pytest.mark.parametrize("argv, fragment", [
    (["--set", "clusters=1"], "clusters"),
    (["--set", "nope=3"], "nope"),
    (["--config", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["--config", "/no/such/file.yaml"], "config file not found"),
    (["--data", "/no/such/data.npz"], "data not found"),
    (["--data", "/no/such/photos/"], "data not found"),
    (["--data", "cifar10:/no/such/root"], "data not found"),
    (["--experiment", ""], "'experiment'"),
    (["--data", "/etc/hostname"], "unknown data format"),
    (["--data", "/no/such/file.beton"], "data file not found"),
    (["--epochs", "many"], "invalid int value"),
    (["--set", "epochs"], "KEY=VALUE"),
    (["--batch-size", "5000", "--workers", "0"], "batch_size"),
    (["--register", "team/model"], "'register'"),
    (["--register", " "], "'register'"),
    pytest.param(["--gpu", "--workers", "0"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_command_line_mistakes_exit_2_with_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_bad_controller_poll_exits_2_before_an_mlflow_run_is_opened(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "soon")
    assert main(["--epochs", "1", "--set", "max_samples=256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("distcluster.train: error: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S must be a number of "
                   "seconds > 0, got 'soon'")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_real_process_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distcluster.train", "--set", "clusters=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("distcluster.train: error: config key 'clusters': "
                                   "K must be in [2, 100000] (got 1)")


def test_assign_sets_dotted_keys_and_list_items_without_touching_the_original():
    values = config.from_dict(config.load_recipe("digits-imc-swav")).to_dict()
    changed = config.assign(values, "augment.crops.1.count", 7)
    changed = config.assign(changed, "imc_swav.temperature", 0.2)
    assert changed["augment"]["crops"][1]["count"] == 7 and changed["imc_swav"]["temperature"] == 0.2
    assert values["augment"]["crops"][1]["count"] != 7  # a copy
    assert config.from_dict(changed).augment.crops[1].count == 7


@pytest.mark.parametrize("key, reason", [
    ("imc_swav.temprature", "'imc_swav.temprature'.*unknown config key"),
    ("augment.crops.5.size", "'augment.crops.5'.*no item 5 in a list of 2"),
    ("augment.crops.x.size", "'augment.crops.x'.*no item x"),
    ("epochs.deep", "'epochs.deep'.*unknown config key"),
])
def test_assign_names_the_missing_key(key, reason):
    values = config.from_dict(config.load_recipe("digits-imc-swav")).to_dict()
    with pytest.raises(ConfigError, match=reason):
        config.assign(values, key, 1)


def test_the_reference_docs_list_every_objective_argument_as_defined():
    """docs/reference.md's tables are generated from the objectives' own definitions: one row per
    argument with its default (`python -m distcluster.config.reference` rewrites them)."""
    from distcluster.config import reference

    text = reference.DOCS.read_text()
    assert reference.with_tables(text) == text, "run: python -m distcluster.config.reference"
    assert "| `imc_swav.temperature` | `0.1` |" in text and "| `iic.head_epochs` | `[1, 2]` |" in text
