"""The one config schema: every field a cm3jax run reads, with its default.

Files in `configs/` start from `base_config()` and override what differs, so a field
exists in every config and `--config.x.y=...` overrides always find their target.
"""

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # local file: our own source


class ConfigError(ValueError):
  """A config, flag or checkpoint that cannot work; the message says why in one line."""


def dataclass_from_dict(cls, fields: dict[str, Any], section: str):
  """`cls(**fields)`, refusing fields `cls` does not have with a message naming them."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ConfigError(f"unknown {section} field(s) {unknown}; known: {sorted(known)}")
  return cls(**fields)


def _integer(low: int, high: float = float("inf")):
  def ok(v):
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
  words = f"an integer >= {low}" if high == float("inf") else f"an integer in [{low}, {high:,.0f}]"
  return ok, words


def _number(low: float, high: float = float("inf"), low_open: bool = False,
            high_open: bool = False):
  def ok(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (low < v if low_open else low <= v) and (v < high if high_open else v <= high))
  left, right = "(" if low_open else "[", ")" if high_open else "]"
  top = "inf" if high == float("inf") else f"{high:g}"
  return ok, f"a number in {left}{low:g}, {top}{right}"


MAX_STEPS = 10**8  # Far beyond any run: a typo (1e12), not a plan.
# Every numeric field of either schema (base_config and configs/vqgan_*.py), by dotted path,
# with the values it accepts. 0 means "off" where a comment in the schema says so.
RANGES = {
    "seq_len": _integer(1), "global_batch_size": _integer(1), "grad_accum_steps": _integer(1),
    "num_train_steps": _integer(1, MAX_STEPS), "log_every": _integer(1),
    "eval_every": _integer(0), "eval_steps": _integer(1), "eval_samples": _integer(0),
    "checkpoint_every": _integer(1),
    "keep_checkpoints": _integer(1), "report_examples": _integer(1),
    "skip_nonfinite_steps": _integer(0), "z_loss": _number(0), "cross_entropy_chunk": _integer(0),
    "cm3.text_vocab_size": _integer(5), "cm3.max_spans": _integer(1),
    "cm3.span_rate": _number(0, low_open=True), "cm3.whole_segment_rate": _number(0, 1),
    "cm3.shuffle_buffer": _integer(1), "cm3.retrieval.documents": _integer(0),
    "cm3.retrieval.per_record": _integer(1), "cm3.retrieval.candidates": _integer(1),
    "cm3.retrieval.query_dropout": _number(0, 1, high_open=True),
    "cm3.retrieval.max_relevance": _number(0), "sft.examples_per_task": _integer(1),
    "sft.max_spans": _integer(1),
    "optimizer.peak_lr": _number(0, low_open=True), "optimizer.end_lr_ratio": _number(0, 1),
    "optimizer.warmup_steps": _integer(0), "optimizer.b1": _number(0, 1, high_open=True),
    "optimizer.b2": _number(0, 1, high_open=True), "optimizer.eps": _number(0, low_open=True),
    "optimizer.weight_decay": _number(0), "optimizer.clip_norm": _number(0),
    # configs/vqgan_*.py
    "batch_size": _integer(1), "learning_rate": _number(0, low_open=True),
    "warmup_steps": _integer(0), "end_lr_ratio": _number(0, 1),
    "b1": _number(0, 1, high_open=True), "b2": _number(0, 1, high_open=True),
    "perceptual_weight": _number(0), "disc_start": _integer(-1), "disc_weight": _number(0),
    "disc_learning_rate": _number(0, low_open=True), "disc_ch": _integer(1),
    "disc_layers": _integer(1), "usage_decay": _number(0, 1, high_open=True),
    "restart_every": _integer(0), "restart_until": _integer(0),
    "dead_code_threshold": _number(0), "eval_images": _integer(1),
}


def check_ranges(config):
  """A ConfigError naming the first field of `config` (either schema) outside its range."""
  for path, (ok, words) in RANGES.items():
    node = config
    for part in path.split("."):
      if part not in node:
        break
      node = node[part]
    else:
      if not ok(node):
        raise ConfigError(f"{path}={node!r} must be {words}")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file; a relative path is looked up here, then in the repository."""
  candidates = (path, os.path.join(REPO, path))
  found = next((p for p in candidates if os.path.isfile(p)), None)  # local file: importlib runs it
  if found is None:
    raise ConfigError(f"no config file {path}")
  spec = importlib.util.spec_from_file_location(os.path.basename(found)[:-3], found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = "synthetic"  # synthetic | cm3 | text | sft (see cm3jax/data/__init__.py)
  # A cm3jax.train workdir whose newest parameters start a new run (fine-tuning, SFT): the
  # optimiser is fresh and the step 0; its model and vocabulary must be this run's. Empty cm3
  # input paths (VQGAN, codes, tokenizer) are then that run's. "": parameters are initialised.
  c.init_from = ""

  c.seq_len = 4096  # Tokens per training row; at most model.max_seq_len.
  c.global_batch_size = 8  # Rows per optimiser step, summed over all devices.
  c.grad_accum_steps = 1  # Microbatches per step; global_batch_size must divide by it.
  c.num_train_steps = 1000

  c.log_every = 10
  c.eval_every = 0  # 0: evaluate only at the end.
  c.eval_steps = 2
  c.eval_samples = 0  # > 0: TensorBoard gets images drawn for this many validation captions and
  # captions of as many validation images at each evaluation (cm3 data with its VQGAN, one host)
  c.checkpoint_every = 500
  c.keep_checkpoints = 3  # The newest checkpoints kept; at least 1.
  c.async_checkpointing = True
  # True: start a new run in a workdir whose checkpoints were all set aside as damaged
  # (WORKDIR/damaged_checkpoints); without it such a start is refused.
  c.new_run_over_damaged = False
  # Non-finite loss or gradient norm: 0 stops the run at that step (no checkpoint of it is
  # written); N > 0 skips the update of up to N such steps, counted in the log, then stops.
  c.skip_nonfinite_steps = 0

  # The cm3 source: the CM3 stream over image-code shards and a text tokenizer, which
  # cm3jax.train reads and cm3jax.pipeline makes where missing (its stages 1 to 3).
  c.cm3 = ml_collections.ConfigDict(dict(
      # What the pipeline encodes: shapes, a TFDS name, tsv:PATH, coco:PATH; for data="text",
      # shapes_text, files:PATTERN or tfds:NAME:FIELD (cm3jax/data/text_corpus.py).
      dataset="",
      data_dir=os.path.expanduser("~/tensorflow_datasets"),
      splits="train,validation",  # Splits to encode.
      vqgan_config="configs/vqgan_shapes.py",  # What the pipeline trains (on shapes data only).
      vqgan_workdir="",  # "" = WORKDIR/vqgan
      codes_dir="",  # Image-code shards, or text records for data="text"; "" = WORKDIR/codes
      tokenizer="",  # A sentencepiece model; "" = WORKDIR/tokenizer.model.
      text_vocab_size=56320,  # Pieces of a tokenizer trained by the pipeline (4 specials included).
      max_spans=16,  # Sentinels in the vocabulary, and the most spans masked in one document.
      span_rate=1.0,  # Poisson rate of the number of masked spans per document.
      # Documents whose one span is a whole caption or image: they train captioning by infilling
      # and the unconditional stream of classifier-free guidance (`<sentinel:0> <break> image`).
      whole_segment_rate=0.0,
      shuffle_buffer=10000,  # Records; files are shuffled too, every epoch.
      # Positions restart at every document and attention stays inside it (as when sampling
      # one document); False: metaseq's stream, attention across packed documents.
      document_attention=False,
      # How an image sits in its document: "break" (CM3Leon's `caption <break> image`) or
      # "html" (CM3's `<img alt="caption" src="image">`; sample it with --task=html_image).
      document_form="break",
      # Retrieval augmentation (CM3Leon §2.1): documents retrieved from a memory bank of the
      # train split, placed before each training document (docs/design.md, "Retrieval").
      retrieval=ml_collections.ConfigDict(dict(
          documents=0,  # Retrieved documents per training document; 0: no retrieval (paper: 3).
          retriever_config="configs/clip_shapes.py",  # What the pipeline trains (shapes data).
          retriever="",  # A train_retriever workdir or a CLIP checkpoint; "" = WORKDIR/retriever
          memory="",  # The memory bank; "" = WORKDIR/memory
          neighbours_dir="",  # "" = WORKDIR/neighbours
          per_record=4,  # Neighbours computed per record (at least `documents`).
          candidates=128,  # Bank candidates searched per query: past its duplicates.
          query_dropout=0.2,  # Share of a text query's tokens dropped before encoding.
          max_relevance=0.9,  # More relevant candidates are near-duplicates, skipped.
          engine="exact",  # MIPS: exact (JAX), faiss_flat or faiss_ivfpq.
      )),
  ))

  # The sft source: instruction-tuning records (cm3jax/data/sft_stream.py), written once into
  # task shards by cm3jax.tokenize_tasks (the pipeline's task-data stage).
  c.sft = ml_collections.ConfigDict(dict(
      tasks_dir="",  # The task shards; "" = WORKDIR/tasks.
      dataset="shapes_tasks",  # What the pipeline tokenizes: shapes_tasks, or jsonl:PATH with
      # {split} in PATH replaced by train, validation (and test).
      examples_per_task=2000,  # shapes_tasks: train records per task (others: report_examples).
      # TASK:RATE,...: each round of the stream draws RATE x a task's records (above 1 repeats
      # it, below 1 takes part of it); a task not named has rate 1.
      mixture="",
      loss_on="all",  # all: every token is a target (the paper) | output: the output's only.
      # The most spans masked in one record (at most cm3.max_spans); a record fits a row when
      # it leaves room for them.
      max_spans=4,
  ))

  c.report_examples = 1000  # The pipeline's last stage: eval_shapes examples per split.

  # Devices per mesh axis (of one slice); -1 takes the devices the other axes leave. Over several
  # TPU slices (multislice), the data axis also spans the `slices` (-1: as many as the devices
  # span): data parallelism across slices, over the data-center network.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, slices=-1))

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=65536,
      num_layers=24,
      d_model=1024,
      num_heads=16,
      mlp_dim=4096,
      max_seq_len=4096,
      activation="relu",  # relu | gelu (exact) | gelu_tanh
      dtype="bfloat16",  # Compute dtype; parameters are always float32.
      scan_layers=True,
      remat_policy="nothing_saveable",  # A jax.checkpoint_policies name, or "none".
      zero_init_residual=True,  # Zero-init the attention and MLP output projections.
      init_std=0.006,
      pos_init_std=0.0002,
      attention="auto",  # auto (cuDNN flash on GPU in bf16/fp16, else XLA) | cudnn | xla
      # Switches for CM3 / OPT / fairseq decoders (docs/design.md, "Token model switches");
      # these defaults are CM3Leon's and change nothing.
      bias=False,  # Biases on the attention projections and the MLP.
      layer_norm_affine=False,  # A scale and a bias on every LayerNorm.
      pre_layer_norm=True,  # False: post-LayerNorm layers, no final LayerNorm.
      positions="learned",  # learned | sinusoidal (fairseq's, position p at row p + 2)
      scale_embeddings=False,  # Token embeddings times sqrt(d_model).
      embed_layer_norm=False,  # A LayerNorm on the summed embeddings.
      tie_embeddings=False,  # The LM head is the token embedding, transposed.
      word_embed_dim=0,  # Word embeddings narrower than d_model (project_in/out); 0: d_model.
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=6e-4,
      end_lr_ratio=0.1,  # Final learning rate as a fraction of peak_lr.
      warmup_steps=1500,
      decay="linear",  # linear | cosine
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,  # Apply weight decay to the token and position tables.
      clip_norm=1.0,  # Global-norm clipping; 0 disables it.
  ))
  c.z_loss = 0.0  # Coefficient of the log(Z)^2 auxiliary loss; 0 disables it.
  # Fuse the loss with the LM head, this many positions of every row at a time, so that the
  # [tokens, vocab] logits never exist at once (cm3jax/training/loss.py); 0: plain logits.
  c.cross_entropy_chunk = 0

  # Peak dense bf16 TFLOP/s of one device, for MFU; None looks the device kind up.
  c.peak_tflops_per_device = ml_collections.config_dict.placeholder(float)
  return c


def paper_config(num_layers: int, d_model: int, num_heads: int, peak_lr: float,
                 train_tokens: float) -> ml_collections.ConfigDict:
  """The CM3Leon paper's pre-training recipe at one model size.

  Sequences of 4,096 tokens, 2,048 per step (8.4M tokens: the paper's 8M), a 65,536-entry
  vocabulary (text pieces, specials, sentinels and 8,192 image codes, padded), MLP width 4·d,
  AdamW betas (0.9, 0.95), weight decay 0.1, clipping at 1.0, 1,500 warm-up steps, then linear
  decay to 10% of the peak learning rate (metaseq's recipe, which trained CM3Leon). The loss is
  fused with the LM head, 1,024 positions at a time.
  """
  c = base_config()
  c.seq_len = 4096
  c.global_batch_size = 2048
  c.num_train_steps = round(train_tokens / (c.global_batch_size * c.seq_len))
  c.log_every = 50
  c.eval_every = 2000
  c.eval_steps = 8
  c.checkpoint_every = 2000
  c.model.update(vocab_size=65536, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                 mlp_dim=4 * d_model, max_seq_len=4096)
  c.cross_entropy_chunk = 1024  # the [tokens, 65,536] float32 logits would dominate memory
  c.optimizer.update(peak_lr=peak_lr, warmup_steps=1500)
  return c


def paper_sft_config(pretraining: ml_collections.ConfigDict, init_from: str = ""
                     ) -> ml_collections.ConfigDict:
  """CM3Leon's instruction-tuning recipe (§4) after a pre-training config: the same model,
  LR 5e-5 after 150 warm-up steps, sequences of 4,096 tokens, 512 per step (2.1M tokens: the
  paper's 2M), 30B tokens (14,305 steps), on the sft source, from the parameters of the run in
  `init_from`. Microbatches keep the pre-training config's rows, and so its memory."""
  c = pretraining
  rows = c.global_batch_size // c.grad_accum_steps
  c.data = "sft"
  c.init_from = init_from
  c.global_batch_size = 512
  c.grad_accum_steps = max(1, c.global_batch_size // rows)
  c.num_train_steps = round(30e9 / (c.global_batch_size * c.seq_len))
  c.eval_every = 500
  c.checkpoint_every = 500
  c.optimizer.update(peak_lr=5e-5, warmup_steps=150)
  return c
