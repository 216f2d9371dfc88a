"""CM3's own checkpoints: a fairseq transformer_lm .pt, its dict.txt and dict.model, imported and
checked against transformers' XGLM (a port of fairseq's decoder) and OPT with the same weights."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from cm3jax.core.vocab import EOS, PAD, SPECIALS, Vocab
from cm3jax.data import shapes
from cm3jax.io import export, fairseq_io
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import engine
from tests.helpers import load_config, tiny_config

NUM_CODES, NUM_SENTINELS = 64, 4


@pytest.fixture(scope="module")
def spm_model():
  captions = [shapes.scene("train", i).caption() for i in range(1000)]
  return train_tokenizer.train(captions, 300)


@pytest.fixture(scope="module")
def dictionary(spm_model):
  """fairseq's symbols in an order of their own: the pieces shuffled, then <eoss>, sentinels,
  image codes I0.., padded to a multiple of 8 as fairseq pads."""
  sp = Vocab(spm_model, 1, 1).processor
  pieces = [sp.id_to_piece(i) for i in range(len(SPECIALS), sp.get_piece_size())]
  np.random.default_rng(0).shuffle(pieces)
  symbols = list(SPECIALS) + pieces + ["<eoss>"] + [f"<sentinel:{i}>" for i in range(NUM_SENTINELS)]
  symbols += [f"I{c}" for c in range(NUM_CODES)]
  symbols += [f"madeupword{i:04d}" for i in range(-len(symbols) % 8)]
  return symbols


def write_files(tmp_path, spm_model, symbols, state, model_cfg, **saved):
  (tmp_path / "dict.txt").write_text("".join(f"{s} {100 + i}\n" for i, s in
                                             enumerate(symbols[len(SPECIALS):])))
  (tmp_path / "dict.model").write_bytes(spm_model)
  torch.save({"cfg": {"model": model_cfg, "task": {"tokens_per_sample": 64}}, "model": state,
              **saved}, tmp_path / "model.pt")
  return str(tmp_path / "model.pt"), str(tmp_path / "dict.txt"), str(tmp_path / "dict.model")


def randomise(model):
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "layer_norm.weight" in name else 0.0))
  return model.eval()


XGLM_SIZES = dict(d_model=45, num_layers=2, attention_heads=3, ffn_dim=52,
                  max_position_embeddings=64)


def xglm_checkpoint(tmp_path, spm_model, symbols, activation="gelu", **cfg_changes):
  """A random XGLM and the same weights as a fairseq transformer_lm checkpoint: sinusoidal
  positions, scaled embeddings, pre-LayerNorm with biases, tied embeddings."""
  model = randomise(transformers.XGLMForCausalLM(transformers.XGLMConfig(
      vocab_size=len(symbols), scale_embedding=True, activation_function=activation,
      pad_token_id=1, bos_token_id=0, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, layerdrop=0.0, **XGLM_SIZES)))
  state = {k.replace("model.", "decoder.", 1): v for k, v in model.state_dict().items()
           if k != "lm_head.weight"}
  state["decoder.output_projection.weight"] = model.state_dict()["lm_head.weight"]
  state["decoder.embed_positions._float_tensor"] = torch.zeros(1)
  state["decoder.version"] = torch.tensor([3.0])
  fairseq_cfg = {"_name": "transformer_lm", "decoder_embed_dim": 45, "decoder_input_dim": 45,
                 "decoder_output_dim": 45, "decoder_layers": 2, "decoder_attention_heads": 3,
                 "decoder_ffn_embed_dim": 52, "decoder_normalize_before": True,
                 "decoder_learned_pos": False, "no_scale_embedding": False,
                 "layernorm_embedding": False, "share_decoder_input_output_embed": True,
                 "activation_fn": {"gelu": "gelu", "gelu_new": "gelu_accurate"}[activation],
                 "adaptive_softmax_cutoff": None, "no_token_positional_embeddings": False,
                 "max_target_positions": None, "dropout": 0.1, **cfg_changes}
  return model, write_files(tmp_path, spm_model, symbols, state, fairseq_cfg)


def imported(files, workdir, **kwargs):
  export.import_cm3(*files, str(workdir), tiny_config(), **kwargs)
  step = checkpoint.latest_step(str(workdir))
  cfg = model_lib.ModelConfig.from_dict(checkpoint.saved_config(str(workdir), step)["model"])
  params = checkpoint.restore_params(str(workdir), step,
                                     engine.abstract_params(cfg, engine.default_mesh()))
  return cfg, jax.device_get(params), checkpoint.load_vocab(str(workdir), step)


def logits(cfg, params, tokens):
  return np.asarray(jax.jit(model_lib.Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens)))


def mapped_ids(vocab, symbols):
  """cm3jax ids whose symbol the dictionary has, and the fairseq index of each."""
  sp = vocab.processor
  names = {i: SPECIALS[i] if i < len(SPECIALS) else sp.id_to_piece(i)
           for i in range(vocab.text_size)}
  names[vocab.eoss_id] = "<eoss>"
  names.update({vocab.sentinel(i): f"<sentinel:{i}>" for i in range(vocab.num_sentinels)})
  names.update({vocab.image_offset + c: f"I{c}" for c in range(vocab.num_image_codes)})
  index = {s: i for i, s in enumerate(symbols)}
  ids = sorted(k for k, name in names.items() if name in index)
  return np.array(ids), np.array([index[names[k]] for k in ids])


@pytest.mark.parametrize("activation", [  # gelu_new: only the activation's name differs
    "gelu", pytest.param("gelu_new", marks=pytest.mark.slow)])
def test_a_fairseq_checkpoint_equals_xglm_left_padded(activation, spm_model, dictionary, tmp_path):
  """(That the import trains on: tests/jobs/test_fairseq.py.)"""
  model, files = xglm_checkpoint(tmp_path, spm_model, dictionary, activation)
  cfg, params, vocab = imported(files, tmp_path / "run")
  assert (cfg.positions, cfg.scale_embeddings, cfg.bias, cfg.layer_norm_affine,
          cfg.tie_embeddings, cfg.pre_layer_norm) == ("sinusoidal", True, True, True, True, True)
  assert (vocab.num_image_codes, vocab.num_sentinels) == (NUM_CODES, NUM_SENTINELS)
  ids, rows = mapped_ids(vocab, dictionary)
  assert len(ids) == vocab.image_offset + NUM_CODES - 1  # all but <break>
  assert vocab.break_id not in ids
  rng = np.random.default_rng(1)
  tokens = ids[rng.integers(0, len(ids), (3, 18))]
  to_fairseq = dict(zip(ids, rows))
  theirs_tokens = np.vectorize(to_fairseq.get)(tokens)
  lengths = [18, 11, 5]
  padded, mask = np.full(tokens.shape, 1), np.zeros(tokens.shape, int)
  for b, n in enumerate(lengths):
    padded[b, 18 - n:], mask[b, 18 - n:] = theirs_tokens[b, :n], 1
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    got = model(torch.from_numpy(padded), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions)).logits.numpy()
  for b, n in enumerate(lengths):
    ours = logits(cfg, params, tokens[b:b + 1, :n])[0]
    np.testing.assert_allclose(ours[:, ids], got[b, 18 - n:][:, rows], atol=1e-4, rtol=0)

  # The checkpoint samples on the devices (greedy, guided by a caption-free stream: the streams
  # are left-padded to one length) what XGLM writes.
  s = engine.Sampler(cfg, params, vocab)
  prompt, uncond = vocab.encode_document(["a red circle"]), np.array([EOS])
  row = s.generate([engine.Request(prompt, jax.random.PRNGKey(0), uncond, 3.0)], 8, "text",
                   engine.SamplingConfig(greedy=True))[0]
  allowed = engine.allowed_tokens(vocab, "text", cfg.vocab_size)[ids]

  def xglm_next(stream_prompt, written):
    theirs_row = [to_fairseq[t] for t in [*stream_prompt, *written]]
    with torch.no_grad():
      return model(torch.tensor([theirs_row]), position_ids=torch.arange(len(theirs_row))[None]
                   ).logits[0, -1].numpy()[rows]

  want = []
  while len(want) < 8 and not set(want) & {EOS, vocab.eoss_id}:
    cond_scores, uncond_scores = xglm_next(prompt, want), xglm_next(uncond, want)
    scores = uncond_scores + 3.0 * (cond_scores - uncond_scores)
    want.append(int(ids[np.argmax(np.where(allowed, scores, -np.inf))]))
  assert row.tolist() == want + [PAD] * (8 - len(want)) and want[0] != EOS


def opt_form_checkpoint(tmp_path, spm_model, symbols, positions=64):
  """A random OPT and the same weights as a fairseq transformer_lm checkpoint of `positions`
  positions: post-LN, learned positions, unscaled embeddings (fairseq's and OPT-350m's form)."""
  model = randomise(transformers.OPTForCausalLM(transformers.OPTConfig(
      vocab_size=len(symbols), hidden_size=36, num_hidden_layers=2, ffn_dim=40,
      num_attention_heads=3, max_position_embeddings=positions, word_embed_proj_dim=36,
      do_layer_norm_before=False, activation_function="relu", pad_token_id=1)))
  state = {k.replace("model.decoder.", "decoder.", 1): v for k, v in model.state_dict().items()
           if k != "lm_head.weight"}
  return model, write_files(tmp_path, spm_model, symbols, state, {
      "_name": "transformer_lm_gpt", "decoder_embed_dim": 36, "decoder_layers": 2,
      "decoder_attention_heads": 3, "decoder_ffn_embed_dim": 40,
      "decoder_normalize_before": False, "decoder_learned_pos": True, "no_scale_embedding": True,
      "share_decoder_input_output_embed": True, "activation_fn": "relu",
      "max_target_positions": positions})


def test_a_post_layer_norm_fairseq_checkpoint_equals_opt(spm_model, dictionary, tmp_path):
  model, files = opt_form_checkpoint(tmp_path, spm_model, dictionary)
  cfg, params, vocab = imported(files, tmp_path / "run")
  assert (cfg.pre_layer_norm, cfg.positions, cfg.scale_embeddings) == (False, "learned", False)
  ids, rows = mapped_ids(vocab, dictionary)
  tokens = ids[np.random.default_rng(2).integers(0, len(ids), (2, 20))]
  to_fairseq = dict(zip(ids, rows))
  with torch.no_grad():
    got = model(torch.from_numpy(np.vectorize(to_fairseq.get)(tokens))).logits.numpy()
  np.testing.assert_allclose(logits(cfg, params, tokens)[..., ids], got[..., rows], atol=1e-4,
                             rtol=0)


def test_an_embedding_layer_norm_is_applied_after_the_positions():
  cfg = model_lib.ModelConfig(vocab_size=16, num_layers=1, d_model=8, num_heads=2, mlp_dim=8,
                              max_seq_len=8, dtype="float32", embed_layer_norm=True,
                              layer_norm_affine=True, positions="sinusoidal",
                              scale_embeddings=True, tie_embeddings=True)
  tokens = jnp.array([[3, 5, 7]])
  params = nn.unbox(model_lib.Decoder(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
  assert "lm_head" not in params and "pos_embed" not in params
  params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                        params)
  hidden = model_lib.Decoder(cfg).apply({"params": params}, tokens, method="hidden")[0]
  without = model_lib.ModelConfig(**{**cfg.to_dict(), "embed_layer_norm": False})
  params_without = {k: v for k, v in params.items() if k != "embed_norm"}
  other = model_lib.Decoder(without).apply({"params": params_without}, tokens, method="hidden")[0]
  assert not np.allclose(hidden, other, atol=1e-3)
  # By hand: the embedding scaled by sqrt(d), plus fairseq's sinusoid at rows 2.., normalised.
  x = params["embed"][tokens[0]] * np.sqrt(8) + model_lib.sinusoidal_positions(
      jnp.arange(3)[None], 8)[0]
  normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  normed = normed * params["embed_norm"]["scale"] + params["embed_norm"]["bias"]
  layer = model_lib.Block(cfg).apply({"params": params["layers"] if not cfg.scan_layers else
                                      jax.tree.map(lambda a: a[0], params["layers"])},
                                     normed[None], None, None, None, None)[0]
  final = model_lib.Norm().apply({"params": params["final_norm"]}, layer)
  np.testing.assert_allclose(hidden, final, atol=1e-5)


def test_sinusoidal_positions_are_fairseqs_table():
  d = 9  # odd: a zero column at the end
  table = transformers.models.xglm.modeling_xglm.XGLMSinusoidalPositionalEmbedding.get_embedding(
      20, d, padding_idx=1).numpy()
  ours = np.asarray(model_lib.sinusoidal_positions(jnp.arange(18)[None], d)[0])
  np.testing.assert_allclose(ours, table[2:], atol=1e-6)


def _state_and_cfg(tmp_path, spm_model, dictionary):
  _, files = xglm_checkpoint(tmp_path, spm_model, dictionary)
  saved = torch.load(files[0], weights_only=True)
  return saved["model"], saved["cfg"]["model"], files


@pytest.mark.parametrize("change, message", [
    (dict(adaptive_softmax_cutoff="10000,50000"),
     "unsupported fairseq option adaptive_softmax_cutoff='10000,50000'"),
    (dict(decoder_input_dim=32), "unsupported fairseq option decoder_input_dim=32 != "
     "decoder_output_dim=45"),
    (dict(activation_fn="tanh"), "unsupported fairseq option activation_fn='tanh'"),
    (dict(scale_attn=True), "unsupported fairseq option scale_attn=True"),
    (dict(_name="transformer"), "fairseq arch 'transformer': cm3jax imports transformer_lm"),
    (dict(decoder_layers=None), "the fairseq config has no decoder_layers"),
    (dict(decoder_learned_pos=True), "the checkpoint has no decoder.embed_positions.weight"),
    (dict(decoder_layers=3), "the checkpoint has no decoder.layers.2.self_attn.q_proj.weight"),
])
def test_unsupported_fairseq_options_are_refused(change, message, spm_model, dictionary, tmp_path):
  state, model_cfg, files = _state_and_cfg(tmp_path, spm_model, dictionary)
  files = write_files(tmp_path, spm_model, dictionary, state, {**model_cfg, **change})
  with pytest.raises(ConfigError, match=re.escape(message)):
    export.import_cm3(*files, str(tmp_path / "run"), tiny_config())
  assert not (tmp_path / "run").exists()


def test_a_repeated_symbol_needs_fairseqs_overwrite_flag_and_then_takes_the_later_index(
    spm_model, dictionary, tmp_path):
  """As fairseq's Dictionary.add_from_file: a repeat without `#fairseq:overwrite` is refused;
  with it the symbol takes a new index (the later line's), and the specials keep 0..3."""
  piece = dictionary[10]
  lines = "".join(f"{s} {100 + i}\n" for i, s in enumerate(dictionary[len(SPECIALS):]))
  path = tmp_path / "dict.txt"
  for repeat, first in ((piece, "line 7"), ("</s>", "fairseq's specials")):
    path.write_text(lines + f"{repeat} 5\n")
    with pytest.raises(ConfigError, match=re.escape(
        f"{path}:{len(dictionary) - 3}: {repeat!r} repeats {first} without "
        "#fairseq:overwrite, which fairseq refuses")):
      fairseq_io.read_dictionary(str(path))
  path.write_text(lines + f"{piece} 5 #fairseq:overwrite\n</s> 3 #fairseq:overwrite\n")
  symbols = fairseq_io.read_dictionary(str(path))
  assert symbols == dictionary + [piece, "</s>"]  # one index per line, as fairseq counts rows
  vocab, rows = fairseq_io.vocabulary(symbols, spm_model)
  assert rows[vocab.processor.piece_to_id(piece)] == len(dictionary)
  assert list(rows[:len(SPECIALS)]) == [0, 1, 2, 3]


def test_the_context_comes_from_the_checkpoint_and_overrides_may_not_contradict_it(
    spm_model, dictionary, tmp_path):
  """docs/export.md's import command with configs/7b.py (seq_len 4,096) on a checkpoint of 2,048
  positions: the import trains 2,048-token rows; an override beyond the checkpoint is refused."""
  _, files = opt_form_checkpoint(tmp_path, spm_model, dictionary, positions=2048)
  config = load_config("7b.py").get_config()
  for overrides, message in (
      ({"seq_len": 4096}, "--config.seq_len=4096 exceeds the checkpoint's 2048 positions"),
      ({"model.max_seq_len": 4096}, "--config.model.max_seq_len=4096: the checkpoint has "
       "max_seq_len=2048 (an import takes the architecture from the checkpoint)")):
    with pytest.raises(ConfigError, match=re.escape(message)):
      export.import_cm3(*files, str(tmp_path / "refused"), config, overrides=overrides)
  assert not (tmp_path / "refused").exists()
  _, _, written = export.import_cm3(*files, str(tmp_path / "run"), config)
  saved = checkpoint.saved_config(str(tmp_path / "run"), 0)
  assert (saved["seq_len"], saved["model"]["max_seq_len"]) == (2048, 2048)
  assert (written.seq_len, written.model.num_layers) == (2048, 2)
  shorter = tiny_config(seq_len=16)  # a context shorter than the checkpoint's stays
  _, _, written = export.import_cm3(*files, str(tmp_path / "short"), shorter,
                                    overrides={"seq_len": 16})
  assert (written.seq_len, written.model.max_seq_len) == (16, 2048)
