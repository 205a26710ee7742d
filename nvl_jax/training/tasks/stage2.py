"""Stage 2: the brain-language model, trained on instruction conversations (the paper's §4).

Reads a stage-1 run (``config.stage1_workdir``: its extractor, dataset and preprocessing) and a
Llama-family LLM checkpoint (``config.llm.checkpoint``: a Hugging Face folder or hub name, or a
GGUF file). What trains is configuration:

- ``train.llm``: ``"frozen"`` (stage 2a: the projector alone), ``"full"`` or ``"lora"`` (stage 2b);
- ``train.extractor``: the stage-1 ViT3D trains too, or stays frozen.

The projector always trains. A batch (``nvl_jax.data.language_pipeline``) holds a trial's betas
and one tokenized conversation of its stimulus; the loss is the next-token cross-entropy on the
answer tokens. ``config.llm.remat`` sets what each LLM decoder layer keeps for the backward pass.

``Task.for_planning`` builds the same train step from the config alone, for ``python -m
nvl_jax.plan --from_config``: no data, no stage-1 checkpoint, no LLM weights.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nvl_jax.data import language_pipeline, volumes
from nvl_jax.data.nsd.layout import NSDGENERAL_VOXELS
from nvl_jax.evaluation import brain_captions
from nvl_jax.language import llm as llm_lib
from nvl_jax.models import brain_lm, layers, llama, vit3d
from nvl_jax.training import experiment, loop, run_config
from nvl_jax.training import task as task_lib
from nvl_jax.training.checkpointing import Checkpointer
from nvl_jax.training.tasks import stage1

LLM_MODES = ("frozen", "full", "lora")


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.train.llm not in LLM_MODES:
        raise ValueError(f"config.train.llm = {config.train.llm!r}: expected one of {LLM_MODES}")
    if llm_remat(config) not in layers.REMAT_POLICIES:
        raise ValueError(f"config.llm.remat = {llm_remat(config)!r}: expected one of {layers.REMAT_POLICIES}")


def llm_remat(config: ml_collections.ConfigDict) -> str:
    # Run folders written before llm.remat existed trained without it.
    return config.llm.get("remat", "none")


def model_config(config: ml_collections.ConfigDict, extractor: vit3d.ViT3DConfig,
                 llm: llama.LlamaConfig) -> brain_lm.BrainLMConfig:
    """The brain-language model of ``config`` on this extractor and LLM architecture."""
    lora = brain_lm.LoRAConfig(rank=config.lora.rank if config.train.llm == "lora" else 0,
                               alpha=config.lora.alpha, targets=tuple(config.lora.targets))
    return brain_lm.BrainLMConfig(extractor=extractor, llm=llm, lora=lora, llm_remat=llm_remat(config))


def ensure_stage1(config: ml_collections.ConfigDict) -> None:
    """Trains ``config.stage1_config`` into ``config.stage1_workdir`` unless a finished run is there.

    A run is finished once it has evaluated (``eval.json``); a killed one resumes.
    """
    workdir = Path(config.stage1_workdir)
    if (workdir / "eval.json").is_file():
        return
    if not config.stage1_config:
        raise FileNotFoundError(f"config.stage1_workdir = {str(workdir)!r}: no finished stage-1 run there (no "
                                "eval.json); train one first: python -m nvl_jax.train --config=configs/nsd.py "
                                f"--workdir={workdir}")
    stage1_config = importlib.import_module(f"nvl_jax.configs.{config.stage1_config}").get_config()
    print(f"{workdir}: no finished stage-1 run; training configs/{config.stage1_config}.py there first")
    loop.train(stage1_config, workdir)


def ensure_instructions(dataset, config: ml_collections.ConfigDict) -> None:
    """Builds the dataset's instruction data on first use when the config allows it (in-silico demos):
    process 0 writes it, every process waits for it."""
    if not dataset.has_instructions() and not config.data.build_instructions:
        raise FileNotFoundError(f"{dataset.root / 'instructions'}: no instruction data. Build it with: python -m "
                                f"nvl_jax.data.instructions --data {dataset.root} [--llava FILE]")

    def build_instructions():
        from nvl_jax.data import instructions

        instructions.write(dataset.root, seed=config.seed)

    experiment.on_first_process(build_instructions, done=dataset.has_instructions)


class BrainLMTask(task_lib.Task):
    """What stage 2's train step is made of: the model, which of its parts train, the batch and the
    loss. ``model_config`` (a ``BrainLMConfig``); the parameters are stored in ``config.llm.dtype``."""

    name = "stage 2"

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 model_config: brain_lm.BrainLMConfig):
        super().__init__(config, mesh)
        self.model_config = model_config
        self.dtype = jnp.dtype(config.llm.dtype)

    def build_model(self) -> brain_lm.BrainLanguageModel:
        return brain_lm.BrainLanguageModel(self.model_config, dtype=self.dtype, rngs=nnx.Rngs(self.config.seed))

    def trainable(self):
        parts = [nnx.PathContains("projector")]
        if self.config.train.llm == "full":
            parts.append(nnx.PathContains("llm"))
        elif self.config.train.llm == "lora":
            parts.append(brain_lm.lora.LoRAParam)
        if self.config.train.extractor:
            parts.append(nnx.PathContains("encoder"))
        return nnx.All(nnx.Param, nnx.Any(*parts))

    def batch_ndims(self) -> dict[str, int]:
        return {"betas": 2, "subject": 1, "stimulus": 1, "input_ids": 2, "attention_mask": 2, "labels": 2}

    def loss(self, model, batch, constants, dropout_key):
        output = model(constants.patches(batch), constants.active, batch["input_ids"], batch["attention_mask"],
                       batch["labels"], rngs=nnx.Rngs(dropout=dropout_key))
        loss, count = brain_lm.next_token_loss(output.logits, output.labels)
        return loss, {"loss": loss, "supervised_tokens": count.astype(jnp.float32)}


class Task(BrainLMTask):
    """Attributes: ``stage1`` (the stage-1 task of the extractor's run), ``dataset``, ``tokenizer``,
    ``model_config`` (a ``BrainLMConfig``), ``conversations`` (the tokenized training conversations)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        check_config(config)
        self.stage1_workdir = Path(config.stage1_workdir)
        ensure_stage1(config)
        self.stage1 = stage1.Task(run_config.load(self.stage1_workdir), mesh)
        self.dataset = self.stage1.dataset
        ensure_instructions(self.dataset, config)
        self.tokenizer = llm_lib.load_tokenizer(config.llm.checkpoint)
        super().__init__(config, mesh, model_config(config, self.stage1.model_config,
                                                    llm_lib.load_config(config.llm.checkpoint)))
        self.conversations = language_pipeline.tokenize_instructions(
            self.dataset.instructions(), config.conversation.format, self.tokenizer,
            max_length=config.data.max_length, kinds=tuple(config.data.kinds))

    @classmethod
    def for_planning(cls, config, mesh, *, upstream=None):
        """``plan_inputs(config, mesh)``; ``upstream``: the extractor's stage-1 config, where
        ``config.stage1_workdir`` holds no run."""
        return plan_inputs(config, mesh, stage1_config=upstream)

    def _stage1_encoder(self):
        """The stage-1 run's ViT3D from its newest checkpoint (a strict restore onto its layout)."""
        layout, _, _ = loop.plan(self.stage1)
        checkpointer = Checkpointer(self.stage1_workdir)
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"{checkpointer.directory}: config.stage1_workdir holds no checkpoint; train "
                                    f"stage 1 first: python -m nvl_jax.train --workdir={self.stage1_workdir}")
        params, _ = checkpointer.restore_params(step, layout)
        checkpointer.close()
        _, frozen = self.stage1.initial_state(layout)
        return layout.merge(params, frozen).vit

    def initial_state(self, layout):
        """The stage-1 extractor, the pretrained LLM (LoRA adapters added at zero) and a random projector."""
        llm = llm_lib.load(self.config.llm.checkpoint, dtype=self.dtype, mesh=self.mesh, rules=self.rules,
                           remat=self.model_config.llm_remat)
        model = brain_lm.BrainLanguageModel(self.model_config, dtype=self.dtype, rngs=nnx.Rngs(self.config.seed),
                                            encoder=self._stage1_encoder(), llm=llm)
        _, params, frozen = nnx.split(model, self.trainable(), ...)
        return jax.device_put(params, layout.param_shardings), jax.device_put(frozen, layout.frozen_shardings)

    # ---- the data ----------------------------------------------------------------------------
    def train_iterator(self):
        c = self.config
        return iter(language_pipeline.train_dataset(self.dataset.root, self.dataset,
                                                    self.conversations, global_batch_size=c.data.batch_size,
                                                    seed=c.seed, worker_count=c.data.worker_count))

    def total_steps(self) -> int:
        c = self.config
        if c.total_steps > 0:
            return c.total_steps
        return max(1, round(c.epochs * language_pipeline.epoch_steps(self.dataset, self.conversations,
                                                                       c.data.batch_size)))

    def constants(self) -> stage1.Preprocessing:
        return self.stage1.prep

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, model, workdir: Path) -> dict:
        """Brief captions of every test stimulus from its brain tokens, against two baselines:
        ``workdir/eval_captions.json`` and ``workdir/captions_test_brief.jsonl``."""
        return brain_captions.evaluate(self, model, Path(workdir))

    def describe(self, results: dict) -> str:
        lines = []
        for mode, entries in results.items():
            parts = [f"{name} CIDEr {m['cider']:.3f} object F1 {m['object_f1']:.3f}" for name, m in entries.items()]
            lines.append(f"{mode}: " + "; ".join(parts))
        return "\n".join(lines)


# ---- planning from the config alone ----------------------------------------------------------
class PlanningTask(BrainLMTask):
    """Stage 2's train step without its data or weights: it compiles and plans, it does not train.

    Its optimizer schedule is ``config.total_steps`` long, or one step when the length is counted in
    epochs of data it does not read: the schedule's length changes no shape.
    """

    def total_steps(self) -> int:
        return max(1, self.config.total_steps)

    def train_iterator(self):
        raise RuntimeError("a stage-2 planning task reads no data: train with nvl_jax.training.tasks.get(config)")

    def evaluate(self, model, workdir: Path) -> dict:
        raise RuntimeError("a stage-2 planning task has no data to evaluate: use nvl_jax.training.tasks.get(config)")


def planning_stage1_config(config: ml_collections.ConfigDict,
                           named: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The extractor's stage-1 config: the run's ``config.json`` in ``config.stage1_workdir`` (what
    training reads), else ``named``, else the config module ``config.stage1_config`` names."""
    workdir = Path(config.stage1_workdir)
    if run_config.path(workdir).is_file():
        return run_config.load(workdir)
    if named is not None:
        return named
    if config.stage1_config:
        return importlib.import_module(f"nvl_jax.configs.{config.stage1_config}").get_config()
    raise FileNotFoundError(
        f"config.stage1_workdir = {str(workdir)!r} holds no stage-1 run (no {run_config.FILENAME}) and "
        "config.stage1_config is empty: name the extractor's stage-1 config, e.g. "
        "python -m nvl_jax.plan --from_config --stage1_config=configs/nsd.py")


def planning_llm_config(checkpoint: str) -> llama.LlamaConfig:
    """The LLM's architecture: a local folder's ``config.json`` or a GGUF's metadata (weights unread),
    else the published architecture of a hub name (``llama.PUBLISHED``)."""
    if Path(llm_lib.resolve(checkpoint)).exists():
        return llm_lib.load_config(checkpoint)
    try:
        return llama.LlamaConfig.published(checkpoint)
    except ValueError as error:
        raise ValueError(f"config.llm.checkpoint = {checkpoint!r} is no local folder or file, and {error}") from None


def _nsd_subjects() -> dict[str, tuple[tuple[int, int, int], int]]:
    from nvl_jax.data.synthetic.anatomy import NSD_GRIDS

    return {f"subj{s:02d}": (NSD_GRIDS[f"subj{s:02d}"], count) for s, count in NSDGENERAL_VOXELS.items()}


def planning_subjects(stage1_config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, int, int], int]]:
    """Subject name -> ``(native grid, voxel count)``: from the metadata (``dataset.json``,
    ``subject.json``) of the prepared dataset at ``config.data.root`` when there is one, else NSD's
    eight subjects with their nsdgeneral voxel counts (an upper bound for NSD runs on fewer subjects,
    and for in-silico NSD)."""
    root = Path(stage1_config.data.root)
    if not (root / "dataset.json").is_file():
        return _nsd_subjects()
    subjects = {}
    for name in json.loads((root / "dataset.json").read_text())["subjects"]:
        info = json.loads((root / "subjects" / name / "subject.json").read_text())
        subjects[name] = (tuple(int(n) for n in info["native_shape"]), int(info["n_voxels"]))
    return subjects


def planning_common_grid(stage1_config: ml_collections.ConfigDict, subjects) -> tuple[int, int, int]:
    """``config.data.common_grid``: ``"X,Y,Z"``, or the native grid of the subject it names."""
    grid = stage1_config.data.common_grid
    if grid in subjects:
        return subjects[grid][0]
    try:
        shape = tuple(int(n) for n in grid.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"stage-1 config.data.common_grid = {grid!r}: expected a subject of {sorted(subjects)} "
                         "or \"X,Y,Z\"")
    return shape


def _stencil_bound(native_grid, common_grid, n_voxels: int) -> int:
    """An upper bound of a subject's resampling entries (``volumes.Geometry``'s ``U``): every voxel
    reaches at most as many common-grid cells per axis as trilinear interpolation gives any input."""
    taps = [int((volumes.trilinear_matrix(n, g) > 0).sum(axis=0).max()) for n, g in zip(native_grid, common_grid)]
    return n_voxels * math.prod(taps)


def plan_inputs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                stage1_config: ml_collections.ConfigDict | None = None, llm: llama.LlamaConfig | None = None
                ) -> tuple[PlanningTask, dict[str, jax.ShapeDtypeStruct], stage1.Preprocessing]:
    """``(task, batch, constants)`` of ``config``'s train step, for planning its memory; nothing is allocated.

    Reads no data, checkpoint or weights, at most small JSON files where they exist:

    - the LLM: ``llm``, else ``planning_llm_config(config.llm.checkpoint)``;
    - the extractor: ``planning_stage1_config(config, stage1_config)``, on its common grid with every
      patch of the grid counted as active (an upper bound of the brain tokens);
    - batch ``[config.data.batch_size, ...]``: betas as wide as the largest subject's voxel count and
      ``config.data.max_length`` text tokens (``planning_subjects``);
    - constants: a ``stage1.Preprocessing`` of shapes (each subject's stencil at its upper bound),
      replicated.
    """
    check_config(config)
    stage1_config = planning_stage1_config(config, stage1_config)
    subjects = planning_subjects(stage1_config)
    common_grid = planning_common_grid(stage1_config, subjects)
    # Stage 2 runs the ViT3D without its CLIP / VAE heads, whose sizes (from cached targets) change
    # nothing here: ViT3DConfig's defaults stand in for them.
    heads = vit3d.ViT3DConfig()
    targets = types.SimpleNamespace(clip_image_embeds=np.empty((0, heads.clip_dim)),
                                    vae_latents=np.empty((0, *heads.vae_latent_shape)))
    extractor = stage1.model_config(stage1_config, common_grid, targets)
    llm = llm if llm is not None else planning_llm_config(config.llm.checkpoint)
    task = PlanningTask(config, mesh, model_config(config, extractor, llm))

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    n_subjects, max_voxels = len(subjects), max(n for _, n in subjects.values())
    entries = max(_stencil_bound(native, common_grid, n) for native, n in subjects.values())
    geometry = volumes.Geometry(
        voxel=jax.ShapeDtypeStruct((n_subjects, entries), jnp.int32, sharding=replicated),
        cell=jax.ShapeDtypeStruct((n_subjects, entries, 3), jnp.int32, sharding=replicated),
        weight=jax.ShapeDtypeStruct((n_subjects, entries), jnp.float32, sharding=replicated),
        common_grid=common_grid, n_voxels=tuple(n for _, n in subjects.values()))
    patch_size = stage1_config.data.patch_size
    n_patches = math.prod(volumes.patch_grid(common_grid, patch_size))
    constants = stage1.Preprocessing(geometry, jax.ShapeDtypeStruct((n_patches, 3), jnp.int32, sharding=replicated),
                                     patch_size)

    size, length = config.data.batch_size, config.data.max_length
    text = jax.ShapeDtypeStruct((size, length), jnp.int32)
    batch = {"betas": jax.ShapeDtypeStruct((size, max_voxels), jnp.float32),
             "subject": jax.ShapeDtypeStruct((size,), jnp.int32), "stimulus": jax.ShapeDtypeStruct((size,), jnp.int32),
             "input_ids": text, "attention_mask": text, "labels": text}
    return task, batch, constants
