"""Export a cm3jax checkpoint to PyTorch, and import an OPT checkpoint into cm3jax
(docs/design.md, "Export").

  python -m cm3jax.export --workdir=workdirs/tiny --out=exported/tiny [--dtype=bfloat16]
  python -m cm3jax.export --import_from=exported/tiny --workdir=workdirs/imported       --config=configs/tiny.py
  python -m cm3jax.export --import_from=model_13B.pt --dict=dict.txt --spm=dict.model       --workdir=workdirs/cm3_13b --config=configs/7b.py

The export writes OUT/ as `transformers.OPTForCausalLM.from_pretrained(OUT)` loads it
(config.json, model.safetensors, generation_config.json), OUT/vqgan/ (the image tokenizer in the
taming / Chameleon layout), OUT/tokenizer/ (tokenizer.model and vocab.json, the layout of the
multimodal vocabulary) and OUT/README.md, a model card with a PyTorch sampling snippet. Tensors
are gathered and written one at a time; OUT appears only when complete.

The export carries the model switches OPT has (biases, LayerNorm affines, post-LayerNorm, tied
or narrower word embeddings) and refuses the ones it lacks (sinusoidal positions, scaled or
normalised embeddings) with one line naming the switch.

The import reads an OPT checkpoint (config.json and model.safetensors or pytorch_model.bin):
cm3jax's own exports, and every transformers OPT (biases, LayerNorm affines, post-LayerNorm
OPT-350m with its project_in / project_out, tied embeddings), and writes a step-0 cm3jax
checkpoint of --config with the model section taken from the OPT config and seq_len at most its
positions, ready to train and sample; --config.FIELD=VALUE overrides what the checkpoint does
not fix. Tensors are read one at a time from the mapped file and placed on the devices leaf by
leaf.

The fairseq import reads CM3's released files (cm3jax/io/fairseq_io.py): the architecture from the
checkpoint's stored fairseq config, the vocabulary from the dictionary and sentencepiece model.
"""


from absl import flags
from ml_collections import config_flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.io import export, fairseq_io


def _define_flags():
  flags.DEFINE_string("workdir", None, "A cm3jax.train workdir: exported from, or imported into.")
  flags.DEFINE_string("out", None, "Export: the directory to write (must not exist).")
  flags.DEFINE_enum("dtype", "float32", list(export.DTYPES), "Export: dtype of the weights.")
  flags.DEFINE_string("import_from", None, "Import: an OPT checkpoint directory, or a fairseq "
                      "model file (CM3's model_13B.pt) with --dict and --spm.")
  flags.DEFINE_string("dict", None, "fairseq import: the model's fairseq dictionary (dict.txt).")
  flags.DEFINE_string("spm", None, "fairseq import: its sentencepiece model (dict.model).")
  flags.DEFINE_string("image_token", fairseq_io.DEFAULT_IMAGE_TOKEN,
                      "fairseq import: how the dictionary writes image code {}.")
  flags.DEFINE_string("sentinel_token", fairseq_io.DEFAULT_SENTINEL_TOKEN,
                      "fairseq import: how the dictionary writes sentinel {}.")
  config_flags.DEFINE_config_file(
      "config", None, "Import: the cm3jax config (configs/*.py) whose model section and context "
      "the checkpoint's replace; --config.FIELD=VALUE overrides a field.", lock_config=True)


def main(FLAGS):
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  if FLAGS.import_from:
    if FLAGS.config is None:
      raise ConfigError("--import_from needs --config (e.g. configs/tiny.py)")
    given = FLAGS.config
    overrides = config_flags.get_override_values(FLAGS["config"])
    if files.isdir(FLAGS.import_from):
      count, config = export.import_opt(FLAGS.import_from, FLAGS.workdir, given, overrides)
      note = ""
    else:
      if not FLAGS.dict or not FLAGS.spm:
        raise ConfigError("a fairseq --import_from needs --dict (dict.txt) and --spm (dict.model)")
      count, missing, config = export.import_cm3(FLAGS.import_from, FLAGS.dict, FLAGS.spm,
                                          FLAGS.workdir, given, FLAGS.image_token,
                                          FLAGS.sentinel_token, overrides)
      note = f" ({missing} vocabulary ids without a fairseq row start at zero)" if missing else ""
    changed = dict(overrides)
    changed.update({f"model.{k}": v for k, v in config.model.items() if given.model.get(k) != v})
    if config.seq_len != given.seq_len:
      changed["seq_len"] = config.seq_len
    train_flags = [f"--config={config_flags.get_config_filename(FLAGS['config'])}",
                   f"--workdir={FLAGS.workdir}", *(f"--config.{k}={v}" for k, v in changed.items())]
    print(f"imported {count:,} parameters into {FLAGS.workdir} (step 0){note}; train it with\n"
          f"  python -m cm3jax.train {' '.join(train_flags)}")
  else:
    if FLAGS.config is not None:
      raise ConfigError("--config is for --import_from: an export writes the workdir's own "
                        "config")
    if not FLAGS.out:
      raise ConfigError("--out is required (or --import_from to import)")
    print(f"exported {FLAGS.workdir} to {export.export(FLAGS.workdir, FLAGS.out, FLAGS.dtype)}")


if __name__ == "__main__":
  cli.run("export", _define_flags, main)
