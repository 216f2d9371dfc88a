"""Weight-only INT8 decoding (docs/design.md, "Decoding"): the sampler's weights stored as int8
with one scale per output channel, through qwix's post-training quantization (PTQ).

qwix quantizes what a layer passes to jnp.einsum as its weight: the attention projections, the
MLP and the LM head, symmetric absmax per channel (one scale per output channel, over the
contracted axis). It does not cover a table read by jnp.take (its PtqProvider intercepts
products only, and jnp.take is none): the token embeddings and the learned positions, 17% of
configs/tiny.py's parameters, would stay in the compute dtype. `Int8Ptq` adds them in qwix's
own way: a parameter looked up by jnp.take is stored int8 with a scale per row (absmax over the
row), and the rows looked up are dequantized. Activations stay in the compute dtype (weight-only):
each product reads its int8 weight and applies the scales to its output.

What stays in the compute dtype: biases and LayerNorm affines (applied elementwise, not read by
a product), the word-embedding projections of OPT-350m-like models (read by matmul, which
`Int8Ptq` does not intercept), and with tied embeddings the table and the head, one parameter
read both ways. Where a product asks for a result type (attention's and the LM head's float32
logits), it keeps it: qwix 0.1.8's PtqProvider.einsum drops it.

qwix is imported here, where the sampler quantizes, not by `cm3jax.sampling.engine` (0.6 s,
flax.nnx included). `Int8Ptq` uses three of its internals (WithAux, HowToQuantize, find_param),
so requirements.txt pins its version.
"""

import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util


class Int8Ptq(qwix.PtqProvider):
  """qwix's PTQ, with tables read by jnp.take quantized per row, float activations left to
  plain einsum, and an einsum's preferred_element_type kept."""

  def einsum(self, einsum_str, *operands, preferred_element_type=None, **kwargs):
    if len(operands) == 2 and isinstance(operands[1], ptq.WithAux):  # a weight, quantized
      x = operands[0]
      if preferred_element_type is not None:
        # The float32 logits of bf16 activations: the activations in float32 (XLA's CPU
        # backend has no bf16 x bf16 = f32 product in the layout qwix's einsum makes).
        x = x.astype(jnp.promote_types(x.dtype, preferred_element_type))
      return qwix.einsum(einsum_str, x, operands[1].array,
                         preferred_element_type=preferred_element_type)
    if len(operands) != 2 or flax_util.find_param(operands[1]) is None:  # activations only
      return jnp.einsum(einsum_str, *operands, preferred_element_type=preferred_element_type,
                        **kwargs)
    # A float weight: while initialising, qwix records how to quantize it.
    return super().einsum(einsum_str, *operands, preferred_element_type=preferred_element_type,
                          **kwargs)

  def take(self, a, indices, axis=None, **kwargs):
    if isinstance(a, ptq.WithAux):  # a table, quantized: dequantize the rows looked up
      rows = jax.tree.map(lambda x: jnp.take(x, indices, axis=axis, **kwargs), a.array)
      return qwix.dequantize(rows)
    rule, _ = self._get_current_rule_and_op_id("take")
    name = flax_util.find_param(a) if isinstance(axis, int) else None
    if rule is None or rule.weight_qtype is None or name is None:
      return jnp.take(a, indices, axis=axis, **kwargs)
    # A float table, while initialising: record a scale per slice along `axis` (per row).
    how = qarray.HowToQuantize(qtype=rule.weight_qtype, channelwise_axes=[axis % a.ndim],
                               calibration_method=rule.weight_calibration_method)
    return self.take(ptq.create_quantized_param(name, a, how), indices, axis, **kwargs)

  def get_intercept_map(self):
    # Products other than einsum (matmul's dot_general, dot, convolutions) are left as they are.
    drop = ("jax.lax.dot_general", "jax.numpy.dot", "jax.lax.conv_general_dilated")
    return {name: fn for name, fn in super().get_intercept_map().items() if name not in drop} | {
        "jax.numpy.take": self.take}


def int8_model(model, tokens_BxL):
  """(the model applying weight-only int8 parameters, a jitted function from the model's
  parameters, unboxed and in its compute dtype, to them). `model`: a `Decoder` with unrolled
  layers; `tokens_BxL`: any tokens, to trace it. With tied embeddings (one parameter, the table
  and the head) the top module's weights stay as they are."""
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8)]
  if model.cfg.tie_embeddings:
    rules.insert(0, qwix.QuantizationRule(module_path=""))  # first match wins: no quantization
  qmodel = qwix.quantize_model(model, Int8Ptq(rules), methods=("__call__", "decode"))
  abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), tokens_BxL)["params"]
  return qmodel, jax.jit(lambda params: qwix.quantize_params(params, abstract))
