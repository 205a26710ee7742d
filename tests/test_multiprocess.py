"""Multi-process training on one machine, as on a pod: launch/local_multiprocess.sh starts two
processes of 4 virtual CPU devices each, one JAX job of 8 (gloo collectives, a coordinator on
localhost), each running ``python -m nvl_jax.train`` on the tiny stage-1 config.

Proven: each process reads only its share of the training records; the losses equal those of one
process on 8 devices with the same global batch; a checkpoint the two processes wrote into their
shared folder resumes exactly in two processes and in one.
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
from etils import epath

from nvl_jax.data import format as data_format
from nvl_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # tests/configs/tiny.py: 6 steps of 8, checkpoints at steps 3 and 6
LOCAL_BATCH = 4  # 8 over 2 processes

# Loaded by every Python process the test starts (it is first on PYTHONPATH): appends the size of the
# record source and the index of every record a process reads to READS_DIR/process_<i>.txt.
# The training code is untouched.
PROBE = '''
import os
if os.environ.get("READS_DIR"):
    import jax
    from nvl_jax.data import pipeline

    _read = pipeline.RecordSource.__getitem__

    def _recorded(self, index):
        with open(os.path.join(os.environ["READS_DIR"], f"process_{jax.process_index()}.txt"), "a") as f:
            f.write(f"{len(self)} {index}\\n")
        return _read(self, index)

    pipeline.RecordSource.__getitem__ = _recorded
'''


def _env(tmp_path, reads: pathlib.Path, devices: int | None) -> dict:
    """The environment of a run: the probe, this checkout's nvl_jax, the tests' compilation cache;
    ``devices`` virtual CPU devices (None: the launcher sets each process's count)."""
    probe = tmp_path / "probe"
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


def _start(processes: int, workdir: pathlib.Path, data: pathlib.Path, tmp_path) -> subprocess.Popen:
    """``python -m nvl_jax.train`` on the tiny config: one process of 8 devices, or a job of ``processes``."""
    train_flags = [f"--config={ROOT / 'tests' / 'configs' / 'tiny.py'}:root={data}", f"--workdir={workdir}"]
    reads = workdir.with_name(workdir.name + "_reads")
    if processes == 1:
        command = [sys.executable, "-m", "nvl_jax.train", *train_flags]
        env = _env(tmp_path, reads, devices=8)
    else:
        command = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(processes), "--", *train_flags]
        env = _env(tmp_path, reads, devices=None)
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


def _reads(workdir: pathlib.Path, n_records: int) -> dict[int, list[int]]:
    """Per process, the indices it read from the record source of ``n_records`` (training, not test)."""
    folder = workdir.with_name(workdir.name + "_reads")
    reads = {}
    for path in folder.glob("process_*.txt"):
        pairs = [line.split() for line in path.read_text().splitlines()]
        reads[int(path.stem.split("_")[1])] = [int(i) for size, i in pairs if int(size) == n_records]
    return reads


def _killed_after_step_3(run: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
    """A copy of a finished run as if it had been killed right after its step-3 checkpoint."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / str(STEPS))
    return copy


def test_two_processes_read_their_shares_train_like_one_and_resume_in_two_or_one(tiny_nsd, tmp_path):
    data = pathlib.Path(tiny_nsd).absolute()
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    _finish(_start(1, one, data, tmp_path), _start(2, two, data, tmp_path))

    # The losses of the 2-process job are those of one process with the same global batch.
    assert sorted(_losses(two)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(_losses(two).values()), list(_losses(one).values()), rtol=1e-5)

    # Each process read records of its own share only: every other record of the global order
    # (seeded shuffle, a new order per epoch), the first STEPS batches' worth at least.
    dataset = data_format.PreparedDataset.open(data)
    n_records = len(pipeline.build_records(dataset, "train", "train"))
    order = grain.MapDataset.range(n_records).seed(0).shuffle().repeat()
    global_order = [order[i] for i in range(n_records)]  # one epoch: more than the run reads
    first_batch = next(iter(pipeline.train_dataset(data, dataset, global_batch_size=8, seed=0)))
    records = pipeline.build_records(dataset, "train", "train")
    np.testing.assert_array_equal(first_batch["stimulus"], records.stimulus[global_order[:8]])
    reads = _reads(two, n_records)
    assert sorted(reads) == [0, 1]
    for process, indices in reads.items():
        share = global_order[process::2]
        assert set(indices) <= set(share), f"process {process} read records outside its share"
        assert set(share[:STEPS * LOCAL_BATCH]) <= set(indices)
        assert len(indices) == len(set(indices))  # nothing read twice
    assert len(_reads(one, n_records)[0]) > max(len(r) for r in reads.values())

    # The 2-process checkpoint of step 3 resumes exactly in 2 processes and in 1.
    again_two = _killed_after_step_3(two, tmp_path / "resumed_in_two")
    again_one = _killed_after_step_3(two, tmp_path / "resumed_in_one")
    outputs = _finish(_start(2, again_two, data, tmp_path), _start(1, again_one, data, tmp_path))
    assert all("resumed from" in output and "checkpoints/3" in output for output in outputs)
    assert _losses(again_two) == _losses(two)
    for resumed, uninterrupted in zip(_params(again_two, STEPS), _params(two, STEPS), strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)
    np.testing.assert_allclose(list(_losses(again_one).values()), list(_losses(two).values()), rtol=1e-5)
    # One process sums the gradients in another order than gloo across two: float noise, which Adam's
    # normalised update turns into differences well below its step size (lr 2e-3) where a gradient is ~0.
    for resumed, uninterrupted in zip(_params(again_one, STEPS), _params(two, STEPS), strict=True):
        np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-3, atol=1e-4)
    assert json.loads((again_one / "eval.json").read_text()).keys() == {"multi_trial", "single_trial"}
