"""The reconstruction sampler: Stable unCLIP from the predicted latent, as one jitted program.

``x_hat = D(denoise(start(z_v, beta) | z_c, prompt))``: the start mixes the brain's predicted VAE
latent ``z_v`` with noise (``beta_start``), the UNet is conditioned on the predicted CLIP image
embedding ``z_c`` (normalized, noised at ``noise_level``, concatenated with the features of that
level, as diffusers' ``StableUnCLIPImg2ImgPipeline`` does) and on a text prompt (the LLM's Stable
Diffusion prompt, or empty), and the VAE decodes the result. Classifier-free guidance runs the
unconditional branch on the empty prompt and all-zero class labels, diffusers' choice.

The text encoding, the noising of the embeddings, every denoising step (a ``lax.scan``) and the
decoding are one ``jax.jit`` program; batch inputs are split over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nvl_jax import sharding
from nvl_jax.diffusion import classifier_free_guidance, noise_image_embeddings
from nvl_jax.reconstruction import beta_start
from nvl_jax.reconstruction.components import StableUnCLIP


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The sampler's knobs. ``guidance_scale <= 1`` turns guidance off (diffusers' rule);
    ``noise_level`` in ``[0, 1000)`` noises the image embedding (0 still adds a little);
    ``beta`` and ``beta_start``: see :mod:`nvl_jax.reconstruction.beta_start`. The paper states
    beta = 0.93 and leaves steps, guidance and noise level open: these defaults are diffusers'."""

    num_inference_steps: int = 20
    guidance_scale: float = 10.0
    noise_level: int = 0
    beta: float = 0.93
    beta_start: str = "linear_mix"

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps}: expected >= 1")
        if not 0 <= self.noise_level < 1000:
            raise ValueError(f"noise_level={self.noise_level}: expected 0 <= noise_level < 1000")
        beta_start.check(self.beta, self.beta_start, self.num_inference_steps)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in ``[0, 1]`` -> uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    return (np.asarray(images) * 255).round().astype(np.uint8)


class UnCLIPSampler:
    """Samples reconstructions from brain predictions with a loaded :class:`StableUnCLIP`.

    One program is compiled per number of steps, start step, guidance on or off and batch shape;
    the models' parameters, beta, the guidance scale and the noise level are its arguments.
    """

    def __init__(self, unclip: StableUnCLIP, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules = sharding.DEFAULT_RULES):
        expected = unclip.unet.config.projection_class_embeddings_input_dim
        if expected != 2 * unclip.embedding_dim:
            raise ValueError(f"{unclip.folder}: the unet takes class labels of {expected}, but the image normalizer's "
                             f"embedding_dim {unclip.embedding_dim} makes {2 * unclip.embedding_dim}")
        self.unclip, self.mesh, self.rules = unclip, mesh, rules
        modules = (unclip.unet, unclip.vae, unclip.text_encoder, unclip.image_normalizer)
        self._graphdefs, self._states = zip(*(nnx.split(m) for m in modules))

    def _place(self, array: np.ndarray | jax.Array) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, sharding.batch_sharding(self.mesh, np.ndim(array), self.rules))

    def __call__(self, z_v, image_embeds, latent_noise, embedding_noise, prompt_ids=None, *,
                 config: SamplingConfig = SamplingConfig()) -> jax.Array:
        """Reconstructions ``[batch, h * f, w * f, 3]`` float32 in ``[0, 1]``.

        ``z_v``: scaled VAE latents ``[batch, h, w, c]``; ``image_embeds``: CLIP image embeddings
        ``[batch, embedding_dim]``; ``latent_noise`` ``[batch, h, w, c]`` and ``embedding_noise``
        ``[batch, embedding_dim]``: standard normal; ``prompt_ids``: int32 ``[batch, length]`` from
        :meth:`StableUnCLIP.tokenize`, or None for the empty prompt. The batch must divide over the
        mesh's batch axes.
        """
        batch = z_v.shape[0]
        if image_embeds.shape != (batch, self.unclip.embedding_dim):
            raise ValueError(f"image_embeds must be [{batch}, {self.unclip.embedding_dim}], "
                             f"got {list(image_embeds.shape)}")
        if latent_noise.shape != z_v.shape or embedding_noise.shape != image_embeds.shape:
            raise ValueError(f"noise shapes {list(latent_noise.shape)}, {list(embedding_noise.shape)} must equal "
                             f"z_v's {list(z_v.shape)} and image_embeds' {list(image_embeds.shape)}")
        empty = self.unclip.tokenize([""])
        if prompt_ids is None:
            prompt_ids = np.repeat(empty, batch, axis=0)
        first_step = beta_start.start_index(config.beta, config.beta_start, config.num_inference_steps)
        run = _program(self._graphdefs, self.unclip.scheduler, self.unclip.image_noising_scheduler,
                       config.num_inference_steps, config.guided, config.beta_start, first_step, self.mesh, self.rules)
        inputs = [self._place(np.asarray(x) if not isinstance(x, jax.Array) else x)
                  for x in (z_v, image_embeds, latent_noise, embedding_noise, prompt_ids)]
        settings = (jnp.float32(config.beta), jnp.float32(config.guidance_scale), jnp.int32(config.noise_level))
        return run(self._states, *inputs, jnp.asarray(empty), *settings)

    def decode(self, z_v) -> jax.Array:
        """The low-level ("blurry") path: the predicted latent ``[batch, h, w, c]`` decoded by the VAE
        alone, ``[batch, h * f, w * f, 3]`` float32 in ``[0, 1]``."""
        return _decode_program(self._graphdefs[1])(self._states[1], self._place(np.asarray(z_v)))


def _decode(vae_model, latents):
    images = vae_model.decode(vae_model.unscale_latents(latents)).astype(jnp.float32)
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _decode_program(graphdef):
    return jax.jit(lambda state, z_v: _decode(nnx.merge(graphdef, state), z_v))


@functools.lru_cache(maxsize=16)
def _program(graphdefs, scheduler, noising_scheduler, num_inference_steps: int, guided: bool, reading: str,
             first_step: int, mesh, rules):
    """The jitted sampler for what shapes the program; beta, the guidance scale and the noise level
    are arguments, so a sweep over them compiles once."""
    out_shardings = None if mesh is None else sharding.batch_sharding(mesh, 4, rules)

    def run(states, z_v, image_embeds, latent_noise, embedding_noise, prompt_ids, empty_ids, beta, guidance_scale,
            noise_level):
        unet_model, vae_model, text_encoder, normalizer = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
        context = text_encoder(prompt_ids).last_hidden_state
        class_labels = noise_image_embeddings(image_embeds.astype(jnp.float32), noise_level,
                                              embedding_noise.astype(jnp.float32), normalizer, noising_scheduler)
        if guided:
            uncond = jnp.broadcast_to(text_encoder(empty_ids).last_hidden_state, context.shape)
            context = jnp.concatenate([uncond, context])
            class_labels = jnp.concatenate([jnp.zeros_like(class_labels), class_labels])

        state = scheduler.init_state(num_inference_steps, z_v.shape, jnp.float32)
        latents = beta_start.start_latents(z_v.astype(jnp.float32), latent_noise.astype(jnp.float32), beta,
                                           reading, scheduler, state.timesteps, first_step)

        def step(carry, index):
            latents, state = carry
            model_input = jnp.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, index)
            prediction = unet_model(model_input, state.timesteps[index], context, class_labels).sample
            if guided:
                prediction = classifier_free_guidance(prediction, guidance_scale)
            latents, state = scheduler.step(state, prediction.astype(jnp.float32), index, latents)
            return (latents, state), None

        indices = jnp.arange(first_step, state.timesteps.shape[0])
        (latents, _), _ = jax.lax.scan(step, (latents, state), indices)
        return _decode(vae_model, latents)

    return jax.jit(run, out_shardings=out_shardings)
