r"""The training loss over the vocabulary alone: plain logits against the loss fused with the
LM head, by chunk size; prints a table.

  python -m benchmarks.loss --batch=8 --chunks=0,1024,2048          # timed on this device
  python -m benchmarks.loss --batch=8 --chunks=0,1024 --topology=v5e:2x2   # compiled for a TPU

Value and gradients (in the final hidden states and in the head) of the objective with a z-loss,
bf16 operands, shaped like 350m's last layer by default (d_model 1024, vocabulary 65,536,
sequence 4096). Chunk 0 is the plain path: [batch, seq, vocab] float32 logits, differentiated by
autodiff. XLA's cost analysis counts a loop body once, so the fused rows' bytes and FLOPs are one
chunk's (of batch x chunk positions); temporaries are for the whole call. With --topology nothing
runs: the call is compiled for one chip of that TPU topology (needs libtpu), and not timed.
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from cm3jax.core import hardware
from cm3jax.training import loss

_BATCH = flags.DEFINE_integer("batch", 8, "Rows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Positions per row.")
_D_MODEL = flags.DEFINE_integer("d_model", 1024, "Width of the hidden states.")
_VOCAB = flags.DEFINE_integer("vocab", 65536, "Vocabulary size.")
_CHUNKS = flags.DEFINE_list("chunks", ["0", "1024"], "cross_entropy_chunk values (0: plain).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile for one chip of this TPU topology.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after the first.")


def objective_and_grads(chunk: int):
  def objective(x_BxLxD, head_DxV, targets_BxL, weights_BxL):
    if chunk:
      return loss.head_cross_entropy(x_BxLxD, head_DxV, targets_BxL, weights_BxL, 1e-4, chunk)
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV, preferred_element_type=jnp.float32)
    sums = loss.cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, 1e-4)
    return sums["loss"] + sums["z_loss"], sums
  return jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))


def main(_):
  B, L, D, V = _BATCH.value, _SEQ_LEN.value, _D_MODEL.value, _VOCAB.value
  device = hardware.tpu_topology(_TOPOLOGY.value)[0][0] if _TOPOLOGY.value else jax.devices()[0]
  where = jax.sharding.SingleDeviceSharding(device)
  shapes = [((B, L, D), jnp.bfloat16), ((D, V), jnp.bfloat16), ((B, L), jnp.int32),
            ((B, L), jnp.float32)]
  print(f"device: {device.device_kind}; batch {B} x {L} positions, d_model {D}, vocabulary {V}"
        f"{' (compile only)' if _TOPOLOGY.value else ''}\n")
  print("| chunk | bytes accessed GiB | TFLOP | temporaries GiB | ms per call |\n|---|---|---|---|---|")
  for chunk in map(int, _CHUNKS.value):
    fn = objective_and_grads(chunk)
    compiled = fn.lower(*[jax.ShapeDtypeStruct(s, d, sharding=where) for s, d in shapes]).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = compiled.memory_analysis().temp_size_in_bytes
    ms = "compile only"
    if not _TOPOLOGY.value:
      keys = jax.random.split(jax.random.PRNGKey(0), 3)
      args = (jax.random.normal(keys[0], (B, L, D), jnp.bfloat16),
              0.02 * jax.random.normal(keys[1], (D, V), jnp.bfloat16),
              jax.random.randint(keys[2], (B, L), 0, V), jnp.ones((B, L), jnp.float32))
      jax.block_until_ready(compiled(*args))
      t = time.perf_counter()
      for _ in range(_REPEATS.value):
        out = compiled(*args)
      jax.block_until_ready(out)
      ms = f"{(time.perf_counter() - t) / _REPEATS.value * 1e3:.1f}"
    print(f"| {chunk or 'plain'} | {cost['bytes accessed'] / 2**30:.2f} | {cost['flops'] / 1e12:.3f} |"
          f" {temp / 2**30:.2f} | {ms} |", flush=True)


if __name__ == "__main__":
  app.run(main)
