"""The generic trainer on the stage-1 task: configs, the sharded step, exact resume, self-describing
run folders, refused resumes, early mesh and batch checks, stopping on NaN, eval.json."""

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

from nvl_jax import sharding
from nvl_jax.configs import demo, nsd
from nvl_jax.training import experiment as experiment_lib
from nvl_jax.training import loop, run_config, steps, tasks
from nvl_jax.training.metrics_writer import MetricsWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_config(path, *args):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def tiny_config(root, **variant):
    arg = ",".join([f"root={root}", *(f"{k}={v}" for k, v in variant.items())])
    return _load_config(ROOT / "tests" / "configs" / "tiny.py", arg)


def test_configs_hold_the_papers_sizes_and_the_demo_is_small():
    paper = nsd.get_config()
    assert (paper.model.depth, paper.model.width, paper.data.batch_size, paper.optimizer.lr, paper.epochs) == (
        16, 768, 32, 5e-4, 30)
    assert paper.loss.alpha == 1 / 64 and paper.data.common_grid == "subj01" and paper.data.patch_size == 14
    assert paper.task == "stage1" and paper.loss.reduction == "squared_norm"
    assert (paper.targets.vae, paper.targets.vae_subfolder) == ("stabilityai/stable-diffusion-2-1-unclip-small", "vae")
    assert dict(paper.sharding_rules)["embed"] == "fsdp" and len(paper.mesh_shape) == 3
    small = demo.get_config()
    assert small.targets.random_init and small.data.synthetic and small.model.width < paper.model.width


def test_config_variants_pick_the_patch_size_and_name_the_run_folder():
    assert [nsd.get_config(f"patch={p}").data.patch_size for p in (14, 12, 10)] == [14, 12, 10]
    assert [demo.get_config(f"patch={p}").data.patch_size for p in (14, 12, 10)] == [14, 12, 10]
    with pytest.raises(ValueError, match="patch must be one of"):
        nsd.get_config("patch=9")
    with pytest.raises(ValueError, match="KEY one of \\['patch'\\]"):
        demo.get_config("patches=12")
    assert experiment_lib.default_workdir("configs/demo.py:patch=12") == pathlib.Path("runs/demo-patch12")
    assert experiment_lib.default_workdir("configs/nsd.py") == pathlib.Path("runs/nsd")


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
    config = nsd.get_config()
    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nvl_jax.data.synthetic --out"):
        experiment_lib.prepare_dataset(config)


def _loss_and_grads(config, mesh):
    """Loss and gradients of one fixed batch from the same initial parameters, computed on ``mesh``."""
    task = tasks.get(config, mesh)
    layout, _, _ = loop.plan(task)
    params, frozen = task.initial_state(layout)
    batch = task.global_batch(next(task.train_iterator()))
    grad_fn = jax.jit(jax.value_and_grad(steps.make_loss_fn(task, layout), has_aux=True))
    (loss, _), grads = grad_fn(params, frozen, batch, task.constants(), jax.random.key(0))
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
    assert loop.evaluate_run(tmp_path / "killed") == evaluation


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


def test_a_run_folder_describes_itself_and_refuses_a_resume_that_changes_shapes(tiny_nsd, tmp_path):
    config = tiny_config(tiny_nsd)
    config.model.depth = 1  # not the tiny config's default: evaluation must read it from the run folder
    config.model.dropout = config.model.attention_dropout = 0.1  # on in training, off in evaluation
    config.total_steps = 3
    first = loop.train(config, tmp_path)
    saved = run_config.load(tmp_path)
    assert saved.model.depth == 1 and saved.data.root == str(pathlib.Path(tiny_nsd).absolute())
    assert loop.evaluate_run(tmp_path) == first  # --workdir alone

    changed = tiny_config(tiny_nsd)
    changed.model.dropout = changed.model.attention_dropout = 0.1
    changed.total_steps = 3
    with pytest.raises(run_config.ConfigMismatchError, match="model.depth: 1 -> 2"):
        loop.train(changed, tmp_path)
    config.total_steps, config.log_every_steps = 4, 2  # harmless: the run goes on to step 4
    loop.train(config, tmp_path)
    assert run_config.load(tmp_path).total_steps == 4
    assert (tmp_path / "checkpoints" / "4").is_dir()


def test_a_run_folder_older_than_a_field_resumes_when_the_field_keeps_its_old_meaning():
    saved = {"model": {"depth": 2}, "sharding_rules": [["embed", "fsdp"]]}
    same = {"model": {"depth": 2, "remat": "none"}, "sharding_rules": [["embed", "fsdp"], ["activation_batch", "data"]]}
    assert run_config.changed_fields(saved, same) == ["sharding_rules"]
    assert "sharding_rules" in run_config.MAY_CHANGE
    assert run_config.changed_fields(saved, {**same, "model": {"depth": 2, "remat": "full"}}) == [
        "model.remat", "sharding_rules"]


def test_evaluate_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        loop.evaluate_run(tmp_path)


def test_bad_mesh_or_batch_fails_before_the_first_step_naming_the_fields():
    config = demo.get_config()
    config.mesh_shape = (3, 1, 1)
    with pytest.raises(ValueError, match=r"config.mesh_shape = \(3, 1, 1\) does not fit the 8 visible cpu"):
        experiment_lib.make_mesh(config)
    config.mesh_shape = (4, 2, 1)
    config.data.batch_size = 12
    with pytest.raises(ValueError, match="config.data.batch_size = 12 does not split over the mesh's data x fsdp"):
        experiment_lib.make_mesh(config)
    config.data.batch_size, config.eval.batch_size = 16, 20
    with pytest.raises(ValueError, match="config.eval.batch_size = 20"):
        experiment_lib.make_mesh(config)
    config.eval.batch_size = 24
    assert dict(experiment_lib.make_mesh(config).shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_unknown_task_is_named():
    config = demo.get_config()
    config.task = "stage9"
    with pytest.raises(ValueError, match="config.task = 'stage9': expected one of .*stage1"):
        tasks.get(config, sharding.make_mesh((-1, 1, 1)))
