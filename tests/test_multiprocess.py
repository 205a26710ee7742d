"""Multi-process training on one machine, as on a pod: launch/local_multiprocess.sh starts two
processes of 4 virtual CPU devices each, one JAX job of 8 (gloo collectives, a coordinator on
localhost), each running ``python -m nvl_jax.train``: on the tiny stage-1 config, then on the tiny
stage-2 config (LoRA on a tiny Llama) over the stage-1 job's run.

Proven for each stage: each process reads only its share of the training records; the losses equal
those of one process on 8 devices with the same global batch; a checkpoint the two processes wrote
into their shared folder resumes exactly in two processes and in one. Stage 2 also builds the
dataset's instruction data on first use (process 0 writes, the other waits) and evaluates at the
end: both processes caption, process 0 alone scores into eval_captions.json, which both report.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from jax.experimental import multihost_utils

from nvl_jax.data import format as data_format
from nvl_jax.data import language_pipeline, pipeline
from nvl_jax.language import llm as llm_lib
from nvl_jax.training import experiment

from test_stage2 import tiny_llm  # noqa: F401 (a fixture)
from test_training import _load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
STEPS = 6  # tests/configs/tiny.py and tiny_language.py: 6 steps of 8, checkpoints at steps 3 and 6
LOCAL_BATCH = 4  # 8 over 2 processes

# Loaded by every Python process the test starts (it is first on PYTHONPATH): appends the class and size
# of the record source and the index of every record a process reads to READS_DIR/process_<i>.txt.
# The training code is untouched.
PROBE = '''
import os
if os.environ.get("READS_DIR"):
    import jax
    from nvl_jax.data import language_pipeline, pipeline

    def _record_reads(source_class):
        read = source_class.__getitem__

        def recorded(self, index):
            with open(os.path.join(os.environ["READS_DIR"], f"process_{jax.process_index()}.txt"), "a") as f:
                f.write(f"{source_class.__name__} {len(self)} {index}\\n")
            return read(self, index)

        source_class.__getitem__ = recorded

    _record_reads(pipeline.RecordSource)
    _record_reads(language_pipeline.ConversationSource)
'''


def _config_flag(name: str, **variant) -> str:
    return f"--config={CONFIGS / name}:" + ",".join(f"{k}={v}" for k, v in variant.items())


def _env(reads: pathlib.Path, devices: int | None) -> dict:
    """The environment of a run: the probe, this checkout's nvl_jax, the tests' compilation cache;
    ``devices`` virtual CPU devices (None: the launcher sets each process's count)."""
    probe = reads.parent / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    reads.mkdir()
    env = dict(os.environ, READS_DIR=str(reads), JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               # this checkout's nvl_jax, not an installed one
               PYTHONPATH=os.pathsep.join([str(ROOT), str(probe)]),
               JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/nvl_jax/jax_tests"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if devices is not None:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _start(processes: int, config_flag: str, workdir: pathlib.Path) -> subprocess.Popen:
    """``python -m nvl_jax.train``: one process of 8 devices, or a job of ``processes``."""
    train_flags = [config_flag, f"--workdir={workdir}"]
    reads = workdir.with_name(workdir.name + "_reads")
    if processes == 1:
        command = [sys.executable, "-m", "nvl_jax.train", *train_flags]
        env = _env(reads, devices=8)
    else:
        command = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(processes), "--", *train_flags]
        env = _env(reads, devices=None)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*runs: subprocess.Popen) -> list[str]:
    outputs = []
    for run in runs:
        output, _ = run.communicate(timeout=1200)
        assert run.returncode == 0, output[-6000:]
        outputs.append(output)
    return outputs


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def _params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """The saved parameters as host arrays (the checkpoint's own shardings name devices of its job)."""
    path = epath.Path(workdir / "checkpoints" / str(step) / "params")
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return jax.tree.leaves(restored)


def _reads(workdir: pathlib.Path, source: str, n_records: int) -> dict[int, list[int]]:
    """Per process, the indices it read from the ``source`` (a class name) of ``n_records`` records."""
    folder = workdir.with_name(workdir.name + "_reads")
    reads = {}
    for path in folder.glob("process_*.txt"):
        rows = [line.split() for line in path.read_text().splitlines()]
        reads[int(path.stem.split("_")[1])] = [int(i) for name, size, i in rows
                                               if name == source and int(size) == n_records]
    return reads


def _global_order(n_records: int) -> list[int]:
    """One epoch of the pipelines' seeded shuffle (a new order per epoch): more than a run reads."""
    order = grain.MapDataset.range(n_records).seed(0).shuffle().repeat()
    return [order[i] for i in range(n_records)]


def _check_shares(one: pathlib.Path, two: pathlib.Path, source: str, global_order: list[int]) -> None:
    """Each process of the ``two`` job read records of its own share only, every other record of the
    global order, the first STEPS batches' worth at least; the 1-process run read more than either."""
    reads = _reads(two, source, len(global_order))
    assert sorted(reads) == [0, 1]
    for process, indices in reads.items():
        share = global_order[process::2]
        assert set(indices) <= set(share), f"process {process} read records outside its share"
        assert set(share[:STEPS * LOCAL_BATCH]) <= set(indices)
        assert len(indices) == len(set(indices))  # nothing read twice
    assert len(_reads(one, source, len(global_order))[0]) > max(len(r) for r in reads.values())


def _killed_after_step_3(run: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
    """A copy of a finished run as if it had been killed right after its step-3 checkpoint."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / str(STEPS))
    return copy


def _resume_in_two_and_in_one(two: pathlib.Path, config_flag: str,
                              *also: subprocess.Popen) -> tuple[pathlib.Path, pathlib.Path]:
    """Resumes copies of ``two`` killed after step 3 in 2 processes and in 1 (while the runs ``also``
    finish), checks that both resumed from the step-3 checkpoint; returns their run folders."""
    again_two = _killed_after_step_3(two, two.with_name(two.name + "_resumed_in_two"))
    again_one = _killed_after_step_3(two, two.with_name(two.name + "_resumed_in_one"))
    outputs = _finish(*also, _start(2, config_flag, again_two), _start(1, config_flag, again_one))
    assert all("resumed from" in out and "checkpoints/3" in out for out in outputs[-2:])
    return again_two, again_one


def _check_resumed_runs(two: pathlib.Path, again_two: pathlib.Path, again_one: pathlib.Path) -> None:
    """In 2 processes: the same losses, bitwise the same parameters. In 1: the same up to float noise."""
    assert _losses(again_two) == _losses(two)
    for resumed, uninterrupted in zip(_params(again_two, STEPS), _params(two, STEPS), strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)
    np.testing.assert_allclose(list(_losses(again_one).values()), list(_losses(two).values()), rtol=1e-5)
    # One process sums the gradients in another order than gloo across two: float noise, which Adam's
    # normalised update turns into differences well below its step size (lr 1e-3, 2e-3) where a gradient is ~0.
    for resumed, uninterrupted in zip(_params(again_one, STEPS), _params(two, STEPS), strict=True):
        np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def stage1_runs(tiny_nsd, tmp_path_factory):
    """``(data, one, two)``: tests/configs/tiny.py trained at once by 1 process of 8 devices (``one``) and
    by 2 of 4 (``two``), on a copy of the shared dataset without instruction data."""
    runs = tmp_path_factory.mktemp("multiprocess")
    data = runs / "data"
    shutil.copytree(tiny_nsd, data, ignore=shutil.ignore_patterns("instructions"))
    config_flag = _config_flag("tiny.py", root=data)
    one, two = runs / "stage1_one_process", runs / "stage1_two_processes"
    _finish(_start(1, config_flag, one), _start(2, config_flag, two))
    return data, one, two


def test_stage1_in_two_processes_reads_its_shares_trains_like_one_and_resumes_in_two_or_one(stage1_runs):
    data, one, two = stage1_runs
    # The losses of the 2-process job are those of one process with the same global batch.
    assert sorted(_losses(two)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(_losses(two).values()), list(_losses(one).values()), rtol=1e-5)

    # The global order the shares are cut from is the pipeline's.
    dataset = data_format.PreparedDataset.open(data)
    records = pipeline.build_records(dataset, "train", "train")
    global_order = _global_order(len(records))
    first_batch = next(iter(pipeline.train_dataset(data, dataset, global_batch_size=8, seed=0)))
    np.testing.assert_array_equal(first_batch["stimulus"], records.stimulus[global_order[:8]])
    _check_shares(one, two, "RecordSource", global_order)

    # The 2-process checkpoint of step 3 resumes exactly in 2 processes and in 1.
    again_two, again_one = _resume_in_two_and_in_one(two, _config_flag("tiny.py", root=data))
    _check_resumed_runs(two, again_two, again_one)
    assert json.loads((again_one / "eval.json").read_text()).keys() == {"multi_trial", "single_trial"}


def test_stage2_in_two_processes_reads_its_shares_trains_like_one_and_resumes_in_two_or_one(stage1_runs, tiny_llm):
    data, _, stage1_run = stage1_runs
    config_flag = _config_flag("tiny_language.py", stage1=stage1_run, llm=tiny_llm)
    one, two = stage1_run.with_name("stage2_one_process"), stage1_run.with_name("stage2_two_processes")

    # The 2-process job alone first: it builds the instruction data, process 0 writing, process 1 waiting.
    assert not (data / "instructions").exists()
    (output,) = _finish(_start(2, config_flag, two))
    assert (data / "instructions" / "instructions.json").is_file()
    # Both processes captioned; process 0 alone scored and wrote the results, which process 1 read back.
    results = json.loads((two / "eval_captions.json").read_text())
    assert results.keys() == {"multi_trial", "single_trial"}
    assert all(mode.keys() == {"brain", "shuffled", "prior"} for mode in results.values())
    assert "PTBTokenizer" in output and "[process 1] PTBTokenizer" not in output
    assert "[process 1] multi_trial: brain CIDEr" in output
    assert len((two / "captions_test_brief.jsonl").read_text().splitlines()) == 16  # 8 records per test mode

    # Then one process of 8 devices, and the 2-process checkpoint of step 3 resumed in 2 processes and in 1.
    again_two, again_one = _resume_in_two_and_in_one(two, config_flag, _start(1, config_flag, one))
    assert sorted(_losses(two)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(_losses(two).values()), list(_losses(one).values()), rtol=1e-5)
    _check_resumed_runs(two, again_two, again_one)

    # The global order of the (training trial, conversation) pairs the shares are cut from is the pipeline's.
    config = _load_config(CONFIGS / "tiny_language.py", f"stage1={stage1_run},llm={tiny_llm}")
    dataset = data_format.PreparedDataset.open(data)
    conversations = language_pipeline.tokenize_instructions(
        dataset.instructions(), config.conversation.format, llm_lib.load_tokenizer(str(tiny_llm)),
        max_length=config.data.max_length, kinds=config.data.kinds)
    pairs = language_pipeline.training_pairs(pipeline.build_records(dataset, "train", "train"), conversations)
    global_order = _global_order(len(pairs))
    first_batch = next(iter(language_pipeline.train_dataset(data, dataset, conversations, global_batch_size=8,
                                                            seed=0)))
    np.testing.assert_array_equal(first_batch["input_ids"], conversations.input_ids[pairs[global_order[:8], 1]])
    _check_shares(one, two, "ConversationSource", global_order)


def test_every_process_waits_at_a_first_use_barrier_whatever_it_sees_on_disk(monkeypatch):
    """Process 0 alone decides whether to write; a process that finds the output written already still
    waits at the barrier (one that skipped it would leave the others waiting there)."""
    writes, barriers = [], []

    def build_instructions():
        writes.append(jax.process_index())

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    for process, written in ((0, False), (0, True), (1, False), (1, True)):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        experiment.on_first_process(build_instructions, done=lambda written=written: written)
    assert writes == [0]
    assert barriers == ["build_instructions"] * 4


# Stands for the interpreter: process 1 fails once the others have started, they would run a minute.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exec "$REAL_PYTHON" "$@"; fi
for arg in "$@"; do case "$arg" in --process_id=*) id="${arg#--process_id=}";; esac; done
echo "process $id started"
touch "$MARKS/$id"
if [[ "$id" == 1 ]]; then
  for _ in $(seq 200); do [[ -e "$MARKS/0" && -e "$MARKS/2" ]] && break; sleep 0.1; done
  exit 3
fi
exec sleep 60  # the launcher's kill must reach the process that holds the output pipe
"""


def test_the_launcher_stops_the_job_when_one_process_fails(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "marks").mkdir()
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, MARKS=str(tmp_path / "marks"))
    run = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "3", "--", "--config=x"],
                         env=dict(env, DEVICES="6"), capture_output=True, text=True, timeout=30)
    assert run.returncode == 3, run.stderr
    assert "no such job" not in run.stderr and "not a child" not in run.stderr
    assert "process 0 started" in run.stdout and "[process 2] process 2 started" in run.stdout
