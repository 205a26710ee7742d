"""Test setup: 8 virtual CPU devices, so sharding is tested for real on any machine.

The XLA flag must be set before jax is first imported, hence here, at the top of
the first module pytest loads.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# A persistent compilation cache makes re-runs of the suite compile much less.
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/nvl_jax/jax_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_nsd(tmp_path_factory):
    """A small in-silico NSD with targets from tiny random CLIP / VAE models; shared by the stage-1 tests."""
    from nvl_jax.data import synthetic, targets

    root = tmp_path_factory.mktemp("tiny_nsd") / "data"
    synthetic.generate(root, synthetic.SyntheticConfig(scale=0.25, train_stimuli=40, test_stimuli=16, sessions=2,
                                                       image_size=64), progress=False)
    targets.cache_targets(root, image_size=64, batch_size=32, random_init=True)
    return root
