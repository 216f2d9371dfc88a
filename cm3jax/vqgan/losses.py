"""VQGAN training losses: PatchGAN discriminator with hinge loss, adaptive GAN weight, and a
perceptual loss whose feature network is pluggable (nothing is downloaded)."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchDiscriminator(nn.Module):
  """taming's NLayerDiscriminator (PatchGAN), with no BatchNorm: 4x4 convs, LeakyReLU(0.2);
  one logit per overlapping patch."""
  ch: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, images_BxHxWx3):
    h = nn.leaky_relu(nn.Conv(self.ch, (4, 4), strides=2, padding=1)(images_BxHxWx3), 0.2)
    for i in range(1, self.num_layers + 1):
      stride = 2 if i < self.num_layers else 1
      h = nn.leaky_relu(nn.Conv(self.ch * min(2**i, 8), (4, 4), strides=stride, padding=1)(h), 0.2)
    return nn.Conv(1, (4, 4), strides=1, padding=1)(h)


def hinge_d_loss(real_logits, fake_logits):
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def adaptive_gan_weight(nll_grad, gan_grad, max_weight: float = 1e4):
  """||d nll / d last layer|| / ||d gan / d last layer||, as in taming's VQLPIPSWithDiscriminator."""
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


class RandomConvFeatures(nn.Module):
  """A fixed, randomly initialised conv net: a download-free perceptual feature extractor.
  Random deep features track perceptual similarity better than pixels do; a pretrained network
  (e.g. LPIPS's VGG, ported) can be registered in FEATURE_NETWORKS instead."""

  @nn.compact
  def __call__(self, images_BxHxWx3):
    features = []
    h = images_BxHxWx3
    for width in (32, 64, 128):
      h = nn.relu(nn.Conv(width, (3, 3), strides=2, padding=1)(h))
      features.append(h)
    return features


# name -> (module, seed); the module maps images to a list of feature maps, frozen at `seed`.
FEATURE_NETWORKS: dict[str, tuple[nn.Module, int]] = {"random_conv": (RandomConvFeatures(), 0)}


def perceptual_loss_fn(name: str, resolution: int) -> Callable:
  """images, reconstructions -> mean squared distance of unit-normalised features."""
  module, seed = FEATURE_NETWORKS[name]
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, resolution, resolution, 3)))

  def loss(images, reconstructions):
    def normalise(f):
      return f * jax.lax.rsqrt(jnp.sum(jnp.square(f), -1, keepdims=True) + 1e-10)
    real, fake = module.apply(params, images), module.apply(params, reconstructions)
    return sum(jnp.mean(jnp.square(normalise(a) - normalise(b))) for a, b in zip(real, fake))

  return loss
