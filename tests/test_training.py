"""Stage-1 training: configs, the sharded step, exact resume, stopping on NaN, eval.json."""

import functools
import importlib.util
import json
import pathlib
import re
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

from nvl_jax import evaluate, sharding
from nvl_jax.data import pipeline
from nvl_jax.training import experiment as experiment_lib
from nvl_jax.training import loop, optim, state as state_lib, steps
from nvl_jax.training.metrics_writer import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_config(path, *args):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def tiny_config(root):
    return _load_config(ROOT / "tests" / "configs" / "tiny.py", str(root))


def test_configs_hold_the_papers_sizes_and_the_demo_is_small():
    nsd = _load_config(ROOT / "configs" / "nsd.py")
    assert (nsd.model.depth, nsd.model.width, nsd.data.batch_size, nsd.optimizer.lr, nsd.epochs) == (16, 768, 32, 5e-4, 30)
    assert nsd.loss.alpha == 1 / 64 and tuple(nsd.data.common_grid) == (83, 104, 81) and nsd.data.patch_size == 14
    assert dict(nsd.sharding_rules)["embed"] == "fsdp" and len(nsd.mesh_shape) == 3
    demo = _load_config(ROOT / "configs" / "demo.py")
    assert demo.targets.random_init and demo.data.synthetic and demo.model.width < nsd.model.width


def test_unknown_override_keys_fail():
    demo = f"--config={ROOT / 'configs' / 'demo.py'}"

    def parse(*overrides):
        argv = ["train", demo, *overrides]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
        return values.config

    config = parse("--config.model.depth=2", "--config.mesh_shape=(2,2,2)")
    assert config.model.depth == 2 and tuple(config.mesh_shape) == (2, 2, 2)
    with pytest.raises(Exception, match="Did you mean \"depth\""):
        parse("--config.model.dept=2")


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sh"])
def test_launch_scripts_parse_and_name_a_loadable_config(script):
    path = ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "--multihost" in text and "python -m nvl_jax.train" in text
    (name,) = set(re.findall(r"configs/\w+\.py", text))
    assert _load_config(ROOT / name).model.depth == 16


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    config = _load_config(ROOT / "configs" / "nsd.py")
    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nvl_jax.data.synthetic --out"):
        experiment_lib.prepare_dataset(config)


def _loss_and_grads(config, mesh):
    """Loss and gradients of one fixed batch from the same initial parameters, computed on ``mesh``."""
    experiment = experiment_lib.build(config, mesh=mesh)
    tx = optim.make_optimizer(config.optimizer, 10)
    build = loop.model_builder(experiment)
    layout = state_lib.plan(build, tx, experiment.mesh, experiment.rules)
    params, _ = state_lib.initialize(build, tx, layout)
    local = next(iter(pipeline.train_dataset(config.data.root, experiment.dataset, global_batch_size=8, seed=0)))
    batch = pipeline.global_batch(local, experiment.mesh, experiment.rules)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(steps.compute_loss, graphdef=layout.graphdef,
                                                           alpha=config.loss.alpha), has_aux=True))
    (loss, _), grads = grad_fn(params, batch, experiment.prep)
    sharded = [leaf.sharding.spec for leaf in jax.tree.leaves(params)]
    return float(loss), jax.tree.map(np.asarray, grads), sharded


def test_train_step_on_a_2x2x2_mesh_equals_one_device(tiny_nsd):
    config = tiny_config(tiny_nsd)
    loss1, grads1, _ = _loss_and_grads(config, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    loss8, grads8, specs = _loss_and_grads(config, sharding.make_mesh((2, 2, 2)))
    assert any(spec != jax.sharding.PartitionSpec() for spec in specs)  # the parameters really are split
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)


def _final_params(workdir, step):
    return ocp.PyTreeCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "params")


def test_killed_run_resumes_exactly(tiny_nsd, tmp_path, monkeypatch):
    config = tiny_config(tiny_nsd)
    loop.train(config, tmp_path / "uninterrupted")

    write = MetricsWriter.write

    def crash_at_step_5(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt("killed after the step-3 checkpoint")
        write(self, step, metrics)

    monkeypatch.setattr(MetricsWriter, "write", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, tmp_path / "killed")
    monkeypatch.setattr(MetricsWriter, "write", write)
    loop.train(config, tmp_path / "killed")

    evaluation = json.loads((tmp_path / "uninterrupted" / "eval.json").read_text())
    assert evaluation.keys() == {"multi_trial", "single_trial"}
    for mode in evaluation.values():
        assert {"brain_to_image_top1", "image_to_brain_top1", "chance_top1", "n_test"} <= mode.keys()
        assert mode["n_test"] == 16 and mode["chance_top1"] == 1 / 16 and len(mode["per_subject"]) == 4

    expected, resumed = _final_params(tmp_path / "uninterrupted", 6), _final_params(tmp_path / "killed", 6)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    reference = [json.loads(line) for line in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == [line["loss"] for line in reference]

    # python -m nvl_jax.evaluate on the finished run restores the final checkpoint and finds what training did.
    assert evaluate.evaluate_run(config, tmp_path / "killed") == evaluation


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_nsd, tmp_path):
    config = tiny_config(tiny_nsd)
    config.optimizer.lr = 1e30  # the second update makes the parameters overflow
    config.optimizer.grad_clip = 0.0
    config.checkpoint_every_steps = 1
    with pytest.raises(FloatingPointError, match="training stopped. The last good checkpoint") as error:
        loop.train(config, tmp_path)
    good = int(str(error.value).split("(step ")[1].split(")")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == good
    params = _final_params(tmp_path, good)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
