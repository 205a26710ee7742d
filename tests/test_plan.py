"""The memory planner: figures planned from abstract arrays match the real step on real devices;
remat shows in them and leaves the gradients as they were; ``python -m nvl_jax.plan`` prints a
verdict on a mesh of virtual devices. Stage 2 plans from its config alone, with no file on disk,
and that plan is the real task's."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nvl_jax import plan as plan_lib
from nvl_jax import sharding
from nvl_jax.configs import demo, nsd_language
from nvl_jax.models import brain_lm, llama
from nvl_jax.models.brain_lm import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from nvl_jax.models.vit3d import BrainEncoder, ViT3DConfig, dual_stream_loss
from nvl_jax.training import loop, state as state_lib, steps, tasks
from nvl_jax.training.tasks import stage2

from test_stage2 import stage1_run, stage2_config, tiny_llm  # noqa: F401 (fixtures)
from test_training import ROOT, tiny_config


def _mesh(shape):
    return sharding.make_mesh(shape)


TINY_LLM = llama.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=8)


def _device_bytes(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


def test_planned_bytes_match_the_real_step_on_real_devices(tiny_nsd):
    config = tiny_config(tiny_nsd)
    config.mesh_shape = (2, 2, 2)
    task = tasks.get(config)
    planned = plan_lib.plan_memory(task, device_memory_gb=80)
    assert planned["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and planned["fits"]

    # The same step on real arrays: parameters, optimizer state and a batch really allocated.
    layout, tx, _ = loop.plan(task)
    params, frozen = task.initial_state(layout)
    opt_state = state_lib.init_optimizer(tx, params, layout)
    batch = task.global_batch(next(task.train_iterator()))
    args = (params, opt_state, frozen, batch, task.constants(), steps.step_counter(0))
    real = steps.make_train_step(task, layout, tx).lower(*args).compile().memory_analysis()
    device = jax.devices()[0]
    measured = {"params": _device_bytes(params, device), "opt_state": _device_bytes(opt_state, device),
                "batch": _device_bytes(batch, device), "temp": real.temp_size_in_bytes,
                "peak": (real.argument_size_in_bytes + real.output_size_in_bytes - real.alias_size_in_bytes
                         + real.temp_size_in_bytes)}
    for name, value in measured.items():
        assert planned["bytes"][name] == pytest.approx(value, rel=0.10), name
    assert planned["bytes"]["params"] < sum(leaf.nbytes for leaf in jax.tree.leaves(params))  # really split
    steps.make_train_step(task, layout, tx)(*args)  # and the step runs


def test_full_remat_keeps_fewer_activations(tiny_nsd):
    figures = {}
    for remat in ("none", "full"):
        config = tiny_config(tiny_nsd)
        config.model.remat = remat
        config.mesh_shape, config.data.batch_size = (2, 2, 2), 16  # enough activations per device to show
        figures[remat] = plan_lib.plan_memory(tasks.get(config))["bytes"]
    assert figures["full"]["activations"] < 0.5 * figures["none"]["activations"]
    assert figures["full"]["temp"] < figures["none"]["temp"]
    assert figures["full"]["params"] == figures["none"]["params"]


def test_alternatives_name_remat_policies_and_a_fully_sharded_mesh():
    config = demo.get_config()
    config.model.remat = "none"
    changes = [change for _, change in plan_lib.alternatives(config)]
    assert {"model.remat": "full"} in changes and {"mesh_shape": (1, -1, 1)} in changes
    assert {"mesh_shape": (1, -1, 1), "model.remat": "full"} in changes
    applied = plan_lib._apply(config, {"mesh_shape": (1, -1, 1), "model.remat": "full"})
    assert (tuple(applied.mesh_shape), applied.model.remat, config.model.remat) == ((1, -1, 1), "full", "none")
    assert plan_lib.parse_mesh("(1, 8,1)") == (1, 8, 1)
    with pytest.raises(ValueError, match="expected \\(data,fsdp,tensor\\)"):
        plan_lib.parse_mesh("(8)")


def test_plan_command_on_virtual_devices(tiny_nsd, tmp_path):
    out = tmp_path / "plan.json"
    config = f"--config={ROOT / 'tests' / 'configs' / 'tiny.py'}:root={tiny_nsd}"
    command = [sys.executable, "-m", "nvl_jax.plan", config, "--mesh", "(1,4,1)", "--devices", "4",
               "--device_memory_gb", "1", f"--json={out}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/nvl_jax/jax_tests"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh (data 1, fsdp 4, tensor 1) on 4 cpu devices" in result.stdout
    assert "verdict: fits in 1 GB" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["devices"] == 4 and plan["fits"] and plan["bytes"]["peak"] > plan["bytes"]["params"] > 0


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_remat_changes_memory_not_gradients(policy):
    """The ViT3D's loss and gradients, dropout on, are those without remat."""
    coords = jnp.array([[0, 0, 0], [1, 2, 1], [0, 1, 1]])
    patches = jax.random.normal(jax.random.key(0), (2, 3, 64))
    clip, vae = jax.random.normal(jax.random.key(1), (2, 16)), jax.random.normal(jax.random.key(2), (2, 4, 4, 4))

    def loss_and_grads(remat):
        config = dataclasses.replace(ViT3DConfig.tiny(), dropout=0.1, remat=remat)
        graphdef, state = nnx.split(BrainEncoder(config, rngs=nnx.Rngs(0)))

        def loss(state):
            output = nnx.merge(graphdef, state)(patches, coords, rngs=nnx.Rngs(dropout=3))
            return dual_stream_loss(output, clip, vae)[0]

        return jax.jit(jax.value_and_grad(loss))(state)

    (expected, expected_grads), (loss, grads) = loss_and_grads("none"), loss_and_grads(policy)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="remat 'some' is not one of"):
        ViT3DConfig(remat="some")


def _stage2_without_files(tmp_path, train_llm="full", remat="none"):
    """A stage-2 config and its stage-1 config whose run, dataset and LLM are nowhere on disk."""
    stage1_config = tiny_config(tmp_path / "no_dataset")
    stage1_config.data.common_grid = "20,26,21"  # the tiny in-silico subj01's grid
    config = nsd_language.get_config(f"stage=2b,llm={train_llm}")
    config.stage1_workdir = str(tmp_path / "no_stage1_run")
    config.llm.dtype, config.llm.remat = "float32", remat
    config.lora.rank = 4
    config.data.batch_size, config.data.max_length = 8, 32
    config.mesh_shape = (1, -1, 1)
    return config, stage1_config


def test_stage2_plans_from_the_config_alone_with_no_file_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, stage1_config = _stage2_without_files(tmp_path)
    task, batch, constants = stage2.plan_inputs(config, _mesh((1, 8, 1)), stage1_config=stage1_config, llm=TINY_LLM)
    # No dataset: NSD's eight subjects, betas as wide as the largest nsdgeneral (subj06's 17907 voxels);
    # every patch of the 20 x 26 x 21 grid at patch size 7 (3 x 4 x 3) is active.
    assert batch["betas"].shape == (8, 17907) and batch["input_ids"].shape == (8, 32)
    assert constants.active.shape == (36, 3) and constants.geometry.voxel.shape[0] == 8
    planned = plan_lib.plan_memory(task, batch=batch, constants=constants, device_memory_gb=1)
    assert planned["fits"] and planned["bytes"]["params"] > 0 and planned["bytes"]["activations"] > 0
    assert list(tmp_path.iterdir()) == []  # no dataset, no stage-1 run, and nothing written

    with pytest.raises(FileNotFoundError, match="holds no stage-1 run .* --stage1_config=configs/nsd.py"):
        stage2.plan_inputs(config, task.mesh, llm=TINY_LLM)
    with pytest.raises(ValueError, match="config.llm.checkpoint = 'someone/llama-9b' is no local folder"):
        config.llm.checkpoint = "someone/llama-9b"
        stage2.plan_inputs(config, task.mesh, stage1_config=stage1_config)
    with pytest.raises(ValueError, match="the stage 1 task takes its shapes from its data"):
        tasks.for_planning(stage1_config)


def test_published_llm_architectures_by_hub_name():
    assert stage2.planning_llm_config("meta-llama/Meta-Llama-3-8B-Instruct") == llama.LlamaConfig.llama3_8b()
    base = llama.LlamaConfig.published("meta-llama/Meta-Llama-3-8B")
    assert base.eos_token_ids == (128001,) and base.num_kv_heads == 8 and not base.tie_word_embeddings


def test_stage2_plan_from_the_config_is_the_real_tasks_plan(stage1_run, tiny_llm):  # noqa: F811
    """The real task (a trained tiny stage-1 run, a tiny LLM folder) and the plan from the config alone
    compile the same step from the same shapes; the real shapes never exceed the planned ones."""
    config = stage2_config(stage1_run, tiny_llm)
    config.train.llm, config.mesh_shape = "full", (1, -1, 1)
    real = tasks.get(config)
    task, batch, constants = tasks.for_planning(config)
    # The same model, but for the stage-1 heads, which stage 2 does not run (their sizes come from the data).
    heads = {k: getattr(real.model_config.extractor, k) for k in ("clip_dim", "vae_latent_shape")}
    extractor = dataclasses.replace(task.model_config.extractor, **heads)
    assert dataclasses.replace(task.model_config, extractor=extractor) == real.model_config
    real_batch = plan_lib.batch_shapes(real)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in real_batch.items()}
    prep = real.constants()
    assert constants.geometry.n_voxels == prep.geometry.n_voxels
    assert constants.geometry.voxel.shape[1] >= prep.geometry.voxel.shape[1]
    assert constants.active.shape[0] >= prep.active.shape[0]

    planned = plan_lib.plan_memory(task, batch=batch, constants=constants)["bytes"]
    same_shapes = plan_lib.plan_memory(real, batch=batch, constants=constants)["bytes"]
    assert planned == same_shapes
    real_plan = plan_lib.plan_memory(real)["bytes"]  # its own batch and preprocessing
    assert real_plan["peak"] <= planned["peak"] and real_plan["params"] == planned["params"]


def test_llm_remat_changes_planned_memory_not_the_loss(tmp_path):
    figures = {}
    for remat in ("none", "full"):
        config, stage1_config = _stage2_without_files(tmp_path, remat=remat)
        config.data.batch_size, config.data.max_length = 16, 128  # enough activations per device to show
        task, batch, constants = stage2.plan_inputs(config, _mesh((8, 1, 1)), stage1_config=stage1_config,
                                                    llm=TINY_LLM)
        figures[remat] = plan_lib.plan_memory(task, batch=batch, constants=constants)["bytes"]
        assert task.model_config.llm_remat == remat
    # What the backward pass keeps: each decoder layer's input instead of its attention scores and MLP
    # activations (measured 8.0 MB -> 0.56 MB). XLA CPU's temp buffer does not shrink with it at these
    # sizes (it grew slightly), so the temp is not held to it here.
    assert figures["full"]["activations"] < 0.2 * figures["none"]["activations"]
    assert figures["full"]["params"] == figures["none"]["params"]

    # The same loss and gradients, with the LLM's layers recomputed in the backward pass; with LoRA,
    # whose adapters are differentiated and the base kernels not.
    extractor = ViT3DConfig.tiny()
    coords = jnp.array([[0, 0, 0], [1, 2, 1], [0, 1, 1]])
    patches = jax.random.normal(jax.random.key(0), (2, 3, extractor.patch_dim))
    ids = jnp.array([[5, IMAGE_TOKEN_INDEX, 7, 8, 9, 0], [3, 4, IMAGE_TOKEN_INDEX, 6, 7, 8]])
    mask = (ids != 0).astype(jnp.int32)
    labels = jnp.where(jnp.arange(6) >= 3, ids, IGNORE_INDEX)

    def loss_and_grads(remat):
        config = brain_lm.BrainLMConfig(extractor=extractor, llm=TINY_LLM, llm_remat=remat,
                                        lora=brain_lm.LoRAConfig(rank=4))
        trainable = nnx.Any(brain_lm.lora.LoRAParam, nnx.PathContains("projector"))
        graphdef, params, frozen = nnx.split(brain_lm.BrainLanguageModel(config, rngs=nnx.Rngs(0)), trainable, ...)

        def loss(params):
            output = nnx.merge(graphdef, params, frozen)(patches, coords, ids, mask, labels)
            return brain_lm.next_token_loss(output.logits, output.labels)[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    (expected, expected_grads), (loss, grads) = loss_and_grads("none"), loss_and_grads("full")
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_llm_remat_is_checked_and_old_run_configs_load_without_it(tmp_path):
    config, stage1_config = _stage2_without_files(tmp_path, remat="some")
    with pytest.raises(ValueError, match="config.llm.remat = 'some': expected one of"):
        stage2.plan_inputs(config, _mesh((1, 8, 1)), stage1_config=stage1_config, llm=TINY_LLM)
    old = ml_collections.ConfigDict(config.to_dict())
    old.llm = ml_collections.ConfigDict({k: v for k, v in config.llm.items() if k != "remat"})
    task, _, _ = stage2.plan_inputs(old, _mesh((1, 8, 1)), stage1_config=stage1_config, llm=TINY_LLM)
    assert task.model_config.llm_remat == "none"
    llm = llama.LlamaForCausalLM(TINY_LLM, remat="full")
    with pytest.raises(ValueError, match="built with remat 'full', the config asks for llm_remat 'none'"):
        brain_lm.BrainLanguageModel(task.model_config, rngs=nnx.Rngs(0), llm=llm)


def test_alternatives_know_the_llm_remat_field(tmp_path):
    config, _ = _stage2_without_files(tmp_path)
    changes = [change for _, change in plan_lib.alternatives(config, devices=8)]
    assert changes == [{"llm.remat": "dots_with_no_batch_dims_saveable"}, {"llm.remat": "full"}]
    config.mesh_shape = (8, 1, 1)
    assert {"mesh_shape": (1, -1, 1), "llm.remat": "full"} in [c for _, c in plan_lib.alternatives(config, 8)]


def test_plan_command_from_the_config_alone(tmp_path):
    """A local LLM folder holding config.json and nothing else; no stage-1 run, no dataset."""
    import transformers

    folder = tmp_path / "llm"
    transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8).save_pretrained(folder)
    out = tmp_path / "plan.json"
    overrides = [f"--config.llm.checkpoint={folder}", f"--config.stage1_workdir={tmp_path / 'none'}",
                 "--config.llm.dtype=float32", "--config.data.batch_size=4", "--config.data.max_length=32"]
    stage1 = f"--stage1_config={ROOT / 'tests' / 'configs' / 'tiny.py'}:root={tmp_path / 'no_dataset'}"
    command = [sys.executable, "-m", "nvl_jax.plan", f"--config={ROOT / 'configs' / 'nsd_language.py'}:stage=2b",
               *overrides, "--from_config", stage1, "--stage1_config.data.common_grid=20,26,21",
               "--mesh", "(1,4,1)", "--devices", "4", "--device_memory_gb", "0.001", f"--json={out}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/nvl_jax/jax_tests"))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does NOT fit in 0.001 GB" in result.stdout and "--config.llm.remat=full" in result.stdout
    plan = json.loads(out.read_text())
    assert plan["devices"] == 4 and {"llm.remat": "full"} in [s["change"] for s in plan["suggestions"]]
