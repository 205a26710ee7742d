"""nvl_jax's schedulers against diffusers' PNDM, DDIM, DPM-Solver++ multistep and DDPM, built from the same configs.

Each sampling loop runs our step inside one jitted ``jax.lax.scan`` (a traced
step index) and diffusers' step in a Python loop, on the same model outputs: a
fixed random output per step plus a term in the current sample, so the
schedulers' errors feed back as they would with a real model.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nvl_jax.diffusion import schedulers

# Stable unCLIP's (and SD 2.x's) sampling scheduler settings: PNDM's PLMS, v-prediction.
UNCLIP_PNDM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                   prediction_type="v_prediction", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                   clip_sample=False, trained_betas=None)
# Stable unCLIP's image_noising_scheduler.
UNCLIP_IMAGE_NOISING = dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, clip_sample=True,
                            prediction_type="epsilon", variance_type="fixed_small")
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SAMPLE_SHAPE = (2, 8, 8, 4)  # [batch, height, width, channels]
RTOL = 1e-5


def reference(name, config):
    """diffusers' scheduler; ``from_config`` ignores other schedulers' keys, as ours does."""
    return getattr(diffusers, name).from_config(config)


def ours(name, config):
    return getattr(schedulers, name).from_config(config)


def assert_close(actual, expected, rtol=RTOL):
    """Agreement relative to the reference's scale (elementwise relative error is meaningless near zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# --- the training noise schedule ------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"),
    SD,
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", beta_start=0.0003, beta_end=0.031, num_train_timesteps=777),
    dict(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1001),
    dict(trained_betas=list(np.linspace(1e-4, 0.03, 50))),
])
@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"])
def test_noise_schedule_is_bit_exact(name, config):
    config = {**config, "skip_prk_steps": True} if name == "PNDMScheduler" else config
    ref, sched = reference(name, config), ours(name, config)
    np.testing.assert_array_equal(sched.betas, ref.betas.numpy())
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert sched.init_noise_sigma == ref.init_noise_sigma


# --- timesteps -------------------------------------------------------------------------------

SPACINGS = [dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="leading"),
            dict(timestep_spacing="linspace"), dict(timestep_spacing="trailing")]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_timesteps_equal_diffusers(name, spacing):
    config = {**UNCLIP_PNDM, **spacing}
    ref, sched = reference(name, config), ours(name, config)
    for steps in (1, 7, 20, 50, 333, 1000):
        if name == "PNDMScheduler" and steps == 1:
            continue  # diffusers' PLMS schedule needs two timesteps
        ref.set_timesteps(steps)
        timesteps = sched.set_timesteps(steps)
        assert timesteps.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(timesteps), ref.timesteps.numpy(), err_msg=f"{steps} steps")


def test_dpm_solver_sigmas_and_lambda_clipping_equal_diffusers():
    """The cosine schedule with lambda_min_clipped (which shortens the schedule), and both final sigmas."""
    for config in [dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
                   dict(**SD, final_sigmas_type="sigma_min"), SD]:
        ref, sched = reference("DPMSolverMultistepScheduler", config), ours("DPMSolverMultistepScheduler", config)
        for steps in (7, 20):
            ref.set_timesteps(steps)
            state = sched.init_state(steps, SAMPLE_SHAPE)
            np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
            # Within an ulp, not bit for bit: torch's CPU float32 sqrt (SLEEF's, 0.5001 ulp) is not
            # always correctly rounded; ours is.
            np.testing.assert_allclose(np.asarray(state.sigmas), ref.sigmas.numpy(), rtol=2.4e-7, atol=0)


# --- sampling loops ---------------------------------------------------------------------------

def fake_model(fixed_output, sample):
    """A deterministic stand-in for the UNet: a fixed output per step plus a term in the sample."""
    return fixed_output + 0.3 * sample


def run_loops(name, config, steps, step_kwargs=None, noise=False, start_index=0):
    """The samples after every step, ours ``[steps, *SAMPLE_SHAPE]`` and diffusers'.

    ``start_index > 0`` starts part-way, as diffusers' img2img pipelines do: from
    ``timesteps[start_index:]`` with a fresh history (and ``set_begin_index``).
    """
    step_kwargs = step_kwargs or {}
    ref, sched = reference(name, config), ours(name, config)
    ref.set_timesteps(steps)
    if start_index and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start_index)
    state = sched.init_state(steps, SAMPLE_SHAPE)
    num = len(ref.timesteps) - start_index
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((num, *SAMPLE_SHAPE)).astype(np.float32)
    noises = rng.standard_normal((num, *SAMPLE_SHAPE)).astype(np.float32)
    start = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)

    expected, sample = [], torch.from_numpy(start)
    for i, t in enumerate(ref.timesteps[start_index:]):
        model_output = fake_model(torch.from_numpy(outputs[i]), sample)
        kwargs = dict(step_kwargs, variance_noise=torch.from_numpy(noises[i])) if noise else step_kwargs
        sample = ref.step(model_output, t, sample, **kwargs).prev_sample
        expected.append(sample.numpy())

    @jax.jit
    def loop(state, start, outputs, noises):
        def body(carry, xs):
            sample, state = carry
            i, fixed_output, step_noise = xs
            kwargs = dict(step_kwargs, noise=step_noise) if noise else step_kwargs
            sample, state = sched.step(state, fake_model(fixed_output, sample), i, sample, **kwargs)
            return (sample, state), sample

        _, samples = jax.lax.scan(body, (start, state), (start_index + jnp.arange(num), outputs, noises))
        return samples

    return np.asarray(loop(state, start, outputs, noises)), np.stack(expected)


PNDM_CASES = [UNCLIP_PNDM, {**UNCLIP_PNDM, "prediction_type": "epsilon"},
              {**UNCLIP_PNDM, "timestep_spacing": "trailing", "set_alpha_to_one": True},
              {**UNCLIP_PNDM, "timestep_spacing": "linspace", "beta_schedule": "linear"}]


@pytest.mark.parametrize("steps", [20, 7])
@pytest.mark.parametrize("config", PNDM_CASES, ids=["unclip", "epsilon", "trailing", "linspace-linear"])
def test_pndm_loop_equals_diffusers(config, steps):
    samples, expected = run_loops("PNDMScheduler", config, steps)
    assert samples.shape == (steps + 1, *SAMPLE_SHAPE)
    assert_close(samples, expected)


DDIM = dict(SD, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
DDIM_CASES = {
    "v": ({**DDIM, "prediction_type": "v_prediction"}, {}),
    "epsilon": ({**DDIM}, {}),
    "sample-clipped": ({**DDIM, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5}, {}),
    "epsilon-alpha-one-trailing": ({**DDIM, "set_alpha_to_one": True, "timestep_spacing": "trailing"}, {}),
    "v-eta": ({**DDIM, "prediction_type": "v_prediction"}, {"eta": 0.7}),
    "epsilon-eta1-linspace": ({**DDIM, "timestep_spacing": "linspace"}, {"eta": 1.0}),
}


@pytest.mark.parametrize("steps", [20, 7])
@pytest.mark.parametrize("case", DDIM_CASES)
def test_ddim_loop_equals_diffusers(case, steps):
    config, step_kwargs = DDIM_CASES[case]
    samples, expected = run_loops("DDIMScheduler", config, steps, step_kwargs, noise="eta" in step_kwargs)
    assert_close(samples, expected)


DPM_CASES = {
    "v": {**SD, "prediction_type": "v_prediction"},
    "epsilon": {**SD},
    "v-leading-offset": {**SD, "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1},
    "epsilon-heun-sigma-min": {**SD, "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    "sample-no-lower-final": {**SD, "prediction_type": "sample", "lower_order_final": False,
                              "final_sigmas_type": "sigma_min"},
    "order1-trailing": {**SD, "solver_order": 1, "timestep_spacing": "trailing"},
    "cosine-clipped-euler-final": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                                   "euler_at_final": True, "final_sigmas_type": "sigma_min"},
}


@pytest.mark.parametrize("steps", [20, 7])
@pytest.mark.parametrize("case", DPM_CASES)
def test_dpm_solver_loop_equals_diffusers(case, steps):
    samples, expected = run_loops("DPMSolverMultistepScheduler", DPM_CASES[case], steps)
    assert_close(samples, expected)


@pytest.mark.parametrize("name,config", [("PNDMScheduler", UNCLIP_PNDM), ("DPMSolverMultistepScheduler", DPM_CASES["v"]),
                                         ("DDIMScheduler", DDIM_CASES["v"][0])])
def test_loop_started_part_way_equals_diffusers_img2img(name, config):
    samples, expected = run_loops(name, config, 20, start_index=6)
    assert_close(samples, expected)


def test_ddim_eta_needs_noise():
    sched = ours("DDIMScheduler", DDIM)
    state = sched.init_state(5)
    with pytest.raises(ValueError, match="eta > 0 needs noise"):
        sched.step(state, jnp.zeros(SAMPLE_SHAPE), 0, jnp.zeros(SAMPLE_SHAPE), eta=0.5)


def test_state_is_a_jit_argument():
    """A run's state (timesteps included) passes through jit as data: no recompilation per run."""
    sched = ours("DPMSolverMultistepScheduler", {**SD, "prediction_type": "v_prediction"})
    step = jax.jit(sched.step)
    state = sched.init_state(20, SAMPLE_SHAPE)
    sample = jnp.ones(SAMPLE_SHAPE)
    for i in range(3):
        sample, state = step(state, sample * 0.5, jnp.int32(i), sample)
    assert int(state.lower_order_nums) == 2
    assert step._cache_size() == 1


def test_scale_model_input_is_identity():
    sample = jnp.arange(8.0)
    for name in ("PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"):
        assert ours(name, UNCLIP_PNDM).scale_model_input(sample, 3) is sample


# --- add_noise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,config", [("DDPMScheduler", UNCLIP_IMAGE_NOISING), ("PNDMScheduler", UNCLIP_PNDM),
                                         ("DDIMScheduler", DDIM)])
def test_add_noise_equals_diffusers(name, config):
    ref, sched = reference(name, config), ours(name, config)
    rng = np.random.default_rng(1)
    original = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    noise = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    for timesteps in ([0, 999], [1, 500]):
        expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.tensor(timesteps))
        actual = jax.jit(sched.add_noise)(original, noise, jnp.array(timesteps))
        assert_close(actual, expected.numpy(), rtol=1e-6)
    # noise_level 0 still noises: abar_0 < 1.
    assert not np.allclose(sched.add_noise(original, noise, jnp.array([0, 0])), original, atol=1e-3)


def test_dpm_solver_add_noise_equals_diffusers_at_scheduled_timesteps():
    config = {**SD, "prediction_type": "v_prediction"}
    ref, sched = reference("DPMSolverMultistepScheduler", config), ours("DPMSolverMultistepScheduler", config)
    ref.set_timesteps(20)
    rng = np.random.default_rng(2)
    original = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    noise = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
    timesteps = ref.timesteps[[3, 17]]
    expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), timesteps)
    actual = sched.add_noise(original, noise, jnp.asarray(timesteps.numpy()))
    assert_close(actual, expected.numpy(), rtol=1e-6)


# --- configs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,config", [("PNDMScheduler", UNCLIP_PNDM), ("DDIMScheduler", DDIM),
                                         ("DPMSolverMultistepScheduler", DPM_CASES["epsilon-heun-sigma-min"]),
                                         ("DDPMScheduler", UNCLIP_IMAGE_NOISING)])
def test_from_config_reads_a_saved_diffusers_config(name, config, tmp_path):
    ref = reference(name, config)
    ref.save_config(tmp_path / "pipeline" / "scheduler")
    saved = json.loads((tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
    loaded = [getattr(schedulers, name).from_config(tmp_path / "pipeline", subfolder="scheduler"),
              getattr(schedulers, name).from_config(tmp_path / "pipeline" / "scheduler" / "scheduler_config.json"),
              schedulers.scheduler_from_config(tmp_path / "pipeline" / "scheduler"),
              getattr(schedulers, name).from_config(dict(ref.config))]
    assert all(s == loaded[0] for s in loaded)
    for field in type(loaded[0].config).__dataclass_fields__:
        value = ref.config[field]
        assert getattr(loaded[0].config, field) == (tuple(value) if isinstance(value, list) else value), field
    if name != "DDPMScheduler":
        ref.set_timesteps(20)
        np.testing.assert_array_equal(np.asarray(loaded[0].set_timesteps(20)), ref.timesteps.numpy())


def test_another_schedulers_config_builds_as_in_diffusers():
    """diffusers' ``DPMSolverMultistepScheduler.from_config(pndm.config)``: PNDM's own keys are ignored."""
    pndm = reference("PNDMScheduler", UNCLIP_PNDM)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(pndm.config)
    sched = schedulers.scheduler_from_config(dict(pndm.config), class_name="DPMSolverMultistepScheduler")
    assert isinstance(sched, schedulers.DPMSolverMultistepScheduler)
    assert sched.config.prediction_type == "v_prediction"
    ref.set_timesteps(20)
    np.testing.assert_array_equal(np.asarray(sched.set_timesteps(20)), ref.timesteps.numpy())


@pytest.mark.parametrize("name,config,field", [
    ("DDIMScheduler", {"thresholding": True}, "thresholding"),
    ("DDIMScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
    ("PNDMScheduler", {"skip_prk_steps": False}, "skip_prk_steps"),
    ("PNDMScheduler", {}, "skip_prk_steps"),
    ("PNDMScheduler", {"skip_prk_steps": True, "beta_schedule": "sigmoid"}, "beta_schedule"),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_unsupported_options_are_refused_by_name(name, config, field):
    with pytest.raises(ValueError, match=field):
        ours(name, config)


def test_unknown_class_name_is_refused():
    with pytest.raises(ValueError, match="_class_name='EulerDiscreteScheduler'"):
        schedulers.scheduler_from_config({"_class_name": "EulerDiscreteScheduler"})
