"""CM3's own checkpoints: a fairseq `transformer_lm` model file (`model_13B.pt`), its fairseq
dictionary (`dict.txt`) and its sentencepiece model (`dict.model`), read into cm3jax
(docs/design.md, "fairseq import").

The architecture comes from the checkpoint's stored fairseq config (`cfg.model`, or `args` in
older files) and becomes `config.model`'s switches; a fairseq option cm3jax cannot represent is
refused with one line naming it. The fairseq dictionary is mapped onto a cm3jax vocabulary built
from the sentencepiece model: each cm3jax id takes the embedding (and output) row of its
symbol's fairseq index: a text piece, `<eoss>`, `<sentinel:i>` and the image codes, written
`I{c}` in CM3's dictionary unless `image_token` says otherwise. Rows cm3jax has and the
dictionary lacks (`<break>`, for one) start at zero and are counted.
"""

import argparse
import dataclasses
from typing import Callable

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.core.vocab import SPECIALS, Vocab, read_spm_model
from cm3jax.io import torch_layout

# fairseq's activation_fn -> cm3jax's activation
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# fairseq options that change the function in ways cm3jax has no switch for, with the value
# that means "off"
UNSUPPORTED = {
    "adaptive_softmax_cutoff": None, "adaptive_input": False, "character_embeddings": False,
    "no_token_positional_embeddings": False, "quant_noise_pq": 0, "cross_self_attention": False,
    "scale_attn": False, "scale_fc": False, "scale_heads": False, "scale_resids": False,
    "alibi": False, "base_layers": 0, "decoder_layers_to_keep": None, "moe_freq": 0,
    "tie_adaptive_weights": False,
}
REQUIRED = ("decoder_embed_dim", "decoder_layers", "decoder_attention_heads",
            "decoder_ffn_embed_dim")
DEFAULT_IMAGE_TOKEN, DEFAULT_SENTINEL_TOKEN, EOSS_TOKEN = "I{}", "<sentinel:{}>", "<eoss>"
OVERWRITE_FLAG = "#fairseq:overwrite"


@dataclasses.dataclass
class Checkpoint:
  """What a fairseq model file holds that cm3jax reads: its model config and its tensors."""
  model: dict
  state: dict  # key -> torch tensor, memory-mapped


def read_checkpoint(path: str) -> Checkpoint:
  if not files.exists(path) or files.isdir(path):
    raise ConfigError(f"--import_from={path} is not a file")
  saved = torch_layout.torch_state(path, allowed=[argparse.Namespace])
  if not isinstance(saved, dict) or "model" not in saved:
    raise ConfigError(f"{path} is not a fairseq checkpoint: it has no 'model' state")
  cfg = saved.get("cfg") or {}
  model = cfg.get("model") if isinstance(cfg, dict) else None
  if model is None and saved.get("args") is not None:
    model = saved["args"]
  if model is None:
    raise ConfigError(f"{path} holds no fairseq config (neither cfg.model nor args): cm3jax "
                      "reads the architecture from it")
  if isinstance(model, argparse.Namespace):
    model = vars(model)
  if not isinstance(model, dict):
    raise ConfigError(f"{path}: the fairseq model config is a {type(model).__name__}, not a "
                      "dictionary")
  task = cfg.get("task") if isinstance(cfg, dict) else None
  model = dict(model)
  if model.get("max_target_positions") is None and isinstance(task, dict):
    model["max_target_positions"] = task.get("max_target_positions") or task.get(
        "tokens_per_sample")
  return Checkpoint(model=model, state=saved["model"])


def model_config(fairseq: dict) -> dict:
  """The `config.model` fields of a fairseq transformer_lm config, or a ConfigError naming the
  fairseq field cm3jax cannot represent."""
  arch = fairseq.get("_name") or fairseq.get("arch") or ""
  if not str(arch).startswith("transformer_lm"):
    raise ConfigError(f"fairseq arch {arch!r}: cm3jax imports transformer_lm decoders")
  for name in REQUIRED:
    if fairseq.get(name) is None:
      raise ConfigError(f"the fairseq config has no {name}")
  for name, off in UNSUPPORTED.items():
    value = fairseq.get(name, off)
    if value not in (off, None, False, 0, ""):
      raise ConfigError(f"unsupported fairseq option {name}={value!r}")
  d = fairseq["decoder_embed_dim"]
  input_dim = fairseq.get("decoder_input_dim") or d
  output_dim = fairseq.get("decoder_output_dim") or d
  if input_dim != output_dim:
    raise ConfigError(f"unsupported fairseq option decoder_input_dim={input_dim} != "
                      f"decoder_output_dim={output_dim}: cm3jax's word embeddings have one width")
  activation = fairseq.get("activation_fn", "relu")
  if activation not in ACTIVATIONS:
    raise ConfigError(f"unsupported fairseq option activation_fn={activation!r} (cm3jax has "
                      f"{sorted(ACTIVATIONS)})")
  pre_layer_norm = bool(fairseq.get("decoder_normalize_before", False))
  if pre_layer_norm and fairseq.get("no_decoder_final_norm", False):
    raise ConfigError("unsupported fairseq option no_decoder_final_norm=True with "
                      "decoder_normalize_before=True")
  max_positions = fairseq.get("max_target_positions")
  if not max_positions:
    raise ConfigError("the fairseq config has no max_target_positions (nor the task's "
                      "tokens_per_sample)")
  return dict(num_layers=fairseq["decoder_layers"], d_model=d,
              num_heads=fairseq["decoder_attention_heads"],
              mlp_dim=fairseq["decoder_ffn_embed_dim"], max_seq_len=int(max_positions),
              activation=ACTIVATIONS[activation], bias=True, layer_norm_affine=True,
              pre_layer_norm=pre_layer_norm,
              positions="learned" if fairseq.get("decoder_learned_pos", False) else "sinusoidal",
              scale_embeddings=not fairseq.get("no_scale_embedding", False),
              embed_layer_norm=bool(fairseq.get("layernorm_embedding", False)),
              tie_embeddings=bool(fairseq.get("share_decoder_input_output_embed", False)),
              word_embed_dim=0 if input_dim == d else input_dim)


def read_dictionary(path: str) -> list[str]:
  """fairseq's symbols by index: its 4 specials (<s> <pad> </s> <unk>), then dict.txt's lines
  (`symbol count [#fairseq:overwrite]`) in order. As fairseq's Dictionary.add_from_file: a
  repeated symbol is refused unless its line is flagged `#fairseq:overwrite`, and then it takes
  a new index, which the symbol maps to from then on (the earlier index keeps its row)."""
  try:
    lines = files.read_bytes(path).decode("utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"cannot read --dict={path}: {e}") from None
  symbols = list(SPECIALS)
  line_of = dict.fromkeys(SPECIALS, 0)
  for number, line in enumerate(lines, 1):
    symbol, _, count = line.rstrip().rpartition(" ")
    overwrite = count == OVERWRITE_FLAG
    if overwrite:
      symbol, _, count = symbol.rpartition(" ")
    if not symbol or not count.lstrip("-").isdigit():
      raise ConfigError(f"{path}:{number}: not a fairseq dictionary line ('symbol count'): "
                        f"{line[:80]!r}")
    if symbol in line_of and not overwrite:
      first = f"line {line_of[symbol]}" if line_of[symbol] else "fairseq's specials"
      raise ConfigError(f"{path}:{number}: {symbol!r} repeats {first} without "
                        f"{OVERWRITE_FLAG}, which fairseq refuses")
    line_of[symbol] = number
    symbols.append(symbol)
  return symbols


def _count(symbols: set[str], form: str) -> int:
  n = 0
  while form.format(n) in symbols:
    n += 1
  return n


def vocabulary(symbols: list[str], spm_model: bytes, image_token: str = DEFAULT_IMAGE_TOKEN,
               sentinel_token: str = DEFAULT_SENTINEL_TOKEN) -> tuple[Vocab, np.ndarray]:
  """The cm3jax vocabulary of the sentencepiece model with the dictionary's sentinels and image
  codes, and for each cm3jax id the fairseq index of its symbol (-1 where the dictionary has
  none)."""
  known = set(symbols)
  num_codes = _count(known, image_token)
  if not num_codes:
    raise ConfigError(f"the dictionary has no image code {image_token.format(0)!r} "
                      f"(--image_token={image_token!r}); pass the form its image codes take")
  vocab = Vocab(spm_model, num_sentinels=max(_count(known, sentinel_token), 1),
                num_image_codes=num_codes)
  # A symbol's last index, as fairseq's Dictionary.index after an overwrite; the specials keep
  # 0..3, the indices fairseq's bos() / pad() / eos() / unk() feed the model.
  index = {s: i for i, s in enumerate(symbols)} | {s: i for i, s in enumerate(SPECIALS)}
  sp = vocab.processor
  names = [SPECIALS[i] if i < len(SPECIALS) else sp.id_to_piece(i) for i in range(vocab.text_size)]
  names += ["<break>", EOSS_TOKEN]
  names += [sentinel_token.format(i) for i in range(vocab.num_sentinels)]
  names += [image_token.format(c) for c in range(vocab.num_image_codes)]
  rows = np.full(vocab.size, -1, np.int64)
  rows[:len(names)] = [index.get(name, -1) for name in names]
  return vocab, rows


def remapped(rows: np.ndarray, get: Callable[[str], np.ndarray],
             keys: tuple[str, ...]) -> Callable[[str], np.ndarray]:
  """`get` with the tensors `keys` ([fairseq vocabulary, width]) taken row by row in cm3jax's
  order (zeros where `rows` is -1)."""
  def get_remapped(key):
    tensor = get(key)
    if key not in keys:
      return tensor
    out = tensor[np.maximum(rows, 0)]
    out[rows < 0] = 0.0
    return out
  return get_remapped


def import_fairseq(path: str, dict_path: str, spm_path: str, image_token: str,
                   sentinel_token: str):
  """(config.model fields, Vocab, fairseq index per cm3jax id, tensor keys, tensor reader) of
  CM3's three files; the reader maps one tensor at a time into cm3jax's vocabulary order."""
  checkpoint = read_checkpoint(path)
  model = model_config(checkpoint.model)
  spm_model = read_spm_model(spm_path)
  symbols = read_dictionary(dict_path)
  embed_key = torch_layout.FAIRSEQ_NAMES.prefix + "embed_tokens.weight"
  if embed_key not in checkpoint.state:
    raise ConfigError(f"{path} has no {embed_key}")
  embed_rows = checkpoint.state[embed_key].shape[0]
  if embed_rows != len(symbols):
    raise ConfigError(f"--dict={dict_path} has {len(symbols)} symbols (with fairseq's 4 "
                      f"specials), {path}'s embedding has {embed_rows} rows: not its dictionary")
  vocab, rows = vocabulary(symbols, spm_model, image_token, sentinel_token)
  model["vocab_size"] = vocab.size
  state = checkpoint.state
  get = remapped(rows, lambda key: state[key].float().numpy(),
                 (embed_key, torch_layout.FAIRSEQ_NAMES.lm_head))
  return model, vocab, rows, set(state), get


def missing_rows(rows: np.ndarray, vocab: Vocab) -> int:
  """How many of the vocabulary's real ids (not its padding) have no fairseq row."""
  real = vocab.image_offset + vocab.num_image_codes
  return int(np.sum(rows[:real] < 0))
