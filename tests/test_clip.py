"""The Flax CLIP against random-weight transformers and open_clip models, its weight layouts and
CLIP's BPE tokenizer."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
import transformers
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from cm3jax.config import ConfigError
from cm3jax import build_memory, build_neighbours  # the commands: main(FLAGS)
from cm3jax.retrieval import bpe, clip, clip_io

TOLERANCE = 1e-4


def random_tokens(rng, batch, length, vocab_size):
  """Rows of ids below the highest, each ending with the highest id at a different place."""
  tokens = rng.integers(1, vocab_size - 1, (batch, length))
  for row in range(batch):
    end = 2 + row % (length - 2)
    tokens[row, end] = vocab_size - 1
    tokens[row, end + 1:] = 0
  return tokens


def embeddings(cfg, params, pixels, tokens):
  model = clip.CLIP(cfg)
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  image = model.apply(variables, jnp.asarray(pixels), method="encode_image")
  text = model.apply(variables, jnp.asarray(tokens), method="encode_text")
  return np.asarray(image), np.asarray(text)


def randomise(module: torch.nn.Module, seed: int):
  """Noise on every tensor (LayerNorms and biases included), so no term hides at 0 or 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_clip(request, tmp_path_factory):
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=3, max_position_embeddings=13, eos_token_id=96,
                       bos_token_id=95, pad_token_id=0, hidden_act=request.param),
      vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                         num_attention_heads=5, image_size=24, patch_size=8,
                         hidden_act=request.param),
      projection_dim=20)
  model = transformers.CLIPModel(config).eval()
  randomise(model, seed=1)
  directory = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
  model.save_pretrained(directory)
  return model, directory


def test_hf_clip_embeddings_match_transformers(hf_clip):
  model, directory = hf_clip
  cfg, params = clip_io.load(directory)
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 24, 24, 3)).astype(np.float32)
  tokens = random_tokens(rng, 3, 13, 97)
  ours_image, ours_text = embeddings(cfg, params, pixels, tokens)
  with torch.no_grad():
    theirs_image = model.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2))
    theirs_text = model.get_text_features(torch.tensor(tokens))
  theirs_image = getattr(theirs_image, "pooler_output", theirs_image).numpy()
  theirs_text = getattr(theirs_text, "pooler_output", theirs_text).numpy()
  assert np.abs(theirs_image).max() > 0.1 and np.abs(theirs_text).max() > 0.1
  np.testing.assert_allclose(ours_image, theirs_image, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(ours_text, theirs_text, atol=TOLERANCE, rtol=0)
  assert float(params["logit_scale"]) == pytest.approx(model.logit_scale.item())


def test_hf_export_then_import_is_bitwise_and_transformers_reads_it(hf_clip, tmp_path):
  model, directory = hf_clip
  cfg, params = clip_io.load(directory)
  clip_io.save_hf(cfg, params, str(tmp_path))
  again_cfg, again = clip_io.load(str(tmp_path))
  assert again_cfg == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)
  reread = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
  tokens = torch.tensor(random_tokens(np.random.default_rng(1), 2, 13, 97))
  with torch.no_grad():
    a, b = model.get_text_features(tokens), reread.get_text_features(tokens)
  a, b = getattr(a, "pooler_output", a), getattr(b, "pooler_output", b)
  np.testing.assert_array_equal(a.numpy(), b.numpy())


OPEN_CLIP_TOLERANCE = 1e-5  # the two activations differ by 2e-3..7e-3 in released models
OPEN_CLIP_CLASSES = {"quick_gelu": "QuickGELU", "gelu": "GELU"}
OTHER_ACTIVATION = {"quick_gelu": "gelu", "gelu": "quick_gelu"}


def open_clip_config(activation: str) -> dict:
  """A tiny model config as open_clip's model_configs/*.json write one."""
  return dict(embed_dim=24, quick_gelu=activation == "quick_gelu",
              vision_cfg=dict(layers=2, width=48, head_width=16, mlp_ratio=2.5, patch_size=4,
                              image_size=20),
              text_cfg=dict(context_length=11, vocab_size=89, width=32, heads=2, layers=3,
                            mlp_ratio=3.0))


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def open_clip_model(request):
  """(activation, a random-weight open_clip CLIP built with it)."""
  model = open_clip.model.CLIP(**open_clip_config(request.param)).eval()
  for mlp in (model.transformer.resblocks[0].mlp, model.visual.transformer.resblocks[0].mlp):
    assert type(mlp.gelu).__name__ == OPEN_CLIP_CLASSES[request.param]
  randomise(model, seed=2)
  return request.param, model


def assert_matches_open_clip(model, cfg, params):
  rng = np.random.default_rng(2)
  pixels = rng.standard_normal((3, 20, 20, 3)).astype(np.float32)
  tokens = random_tokens(rng, 3, 11, 89)
  ours_image, ours_text = embeddings(cfg, params, pixels, tokens)
  with torch.no_grad():
    theirs_image = model.encode_image(torch.tensor(pixels).permute(0, 3, 1, 2)).numpy()
    theirs_text = model.encode_text(torch.tensor(tokens)).numpy()
  np.testing.assert_allclose(ours_image, theirs_image, atol=OPEN_CLIP_TOLERANCE, rtol=0)
  np.testing.assert_allclose(ours_text, theirs_text, atol=OPEN_CLIP_TOLERANCE, rtol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_state_dict_embeddings_match_open_clip(open_clip_model, tmp_path, suffix):
  activation, model = open_clip_model
  path = str(tmp_path / f"model{suffix}")
  state = model.state_dict()
  if suffix == ".pt":
    torch.save(state, path)
  else:
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, path)
  cfg, params = clip_io.load(path, head_width=16, activation=activation)
  assert (cfg.vision_heads, cfg.text_heads, cfg.vision_mlp_dim, cfg.eot_id) == (3, 2, 120, 88)
  assert cfg.activation == activation
  assert_matches_open_clip(model, cfg, params)
  # The check sees the other activation (the import's old QuickGELU-for-all).
  with pytest.raises(AssertionError):
    assert_matches_open_clip(model, dataclasses.replace(
        cfg, activation=OTHER_ACTIVATION[activation]), params)


def test_open_clip_hub_layout_records_the_activation(open_clip_model, tmp_path):
  """open_clip's Hugging Face Hub layout: the weights beside open_clip_config.json."""
  from open_clip.push_to_hf_hub import save_config_for_hf
  from safetensors.torch import save_file
  activation, model = open_clip_model
  # open_clip.create_model sets these; save_config_for_hf writes them as the preprocess_cfg.
  model.visual.image_mean, model.visual.image_std = clip.OPENAI_MEAN, clip.OPENAI_STD
  save_config_for_hf(model, tmp_path / clip_io.OPEN_CLIP_CONFIG, open_clip_config(activation))
  path = str(tmp_path / "open_clip_model.safetensors")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  cfg, params = clip_io.load(path, head_width=16)
  assert cfg.activation == activation
  assert_matches_open_clip(model, cfg, params)
  with pytest.raises(ConfigError, match=f"records the activation '{activation}'"):
    clip_io.load(path, head_width=16, activation=OTHER_ACTIVATION[activation])


def test_a_torchscript_archive_records_the_activation(open_clip_model, tmp_path):
  """OpenAI's released .pt files are TorchScript archives; they keep their modules' classes."""
  activation, model = open_clip_model
  example = (torch.zeros(1, 3, 20, 20), torch.zeros(1, 11, dtype=torch.long))
  traced = torch.jit.trace(model, example, check_trace=False)
  path = str(tmp_path / "traced.pt")
  torch.jit.save(traced, path)
  cfg, params = clip_io.load(path, head_width=16)
  assert cfg.activation == activation
  assert_matches_open_clip(model, cfg, params)


@pytest.mark.parametrize("model_name,force,expected", [
    ("ViT-B-32", "False", "gelu"), ("ViT-B-32-quickgelu", "False", "quick_gelu"),
    ("ViT-B-32", "True", "quick_gelu"), ("my-own-model", "False", None)])
def test_an_open_clip_training_checkpoint_takes_its_runs_activation(tmp_path, model_name, force,
                                                                     expected):
  """open_clip_train writes RUN/params.txt and RUN/checkpoints/epoch_N.pt."""
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "params.txt").write_text(f"force_quick_gelu: {force}\nlr: 0.0005\n"
                                       f"model: {model_name}\n")
  path = str(tmp_path / "checkpoints" / "epoch_1.pt")
  state = open_clip.model.CLIP(**open_clip_config("gelu")).state_dict()
  torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
  if expected is None:
    with pytest.raises(ConfigError, match="does not record its MLP activation"):
      clip_io.load(path, head_width=16)
    cfg, params = clip_io.load(path, head_width=16, activation="gelu")
  else:
    cfg, params = clip_io.load(path, head_width=16)
  assert cfg.activation == (expected or "gelu")
  assert params["visual"]["transformer"]["query_kernel"].shape == (2, 48, 3, 16)


def test_an_unrecorded_or_unknown_activation_is_refused_in_one_line(tmp_path, hf_clip):
  state = open_clip.model.CLIP(**open_clip_config("gelu")).state_dict()
  path = str(tmp_path / "model.pt")
  torch.save(state, path)
  with pytest.raises(ConfigError, match="does not record its MLP activation.*--clip_activation"):
    clip_io.load(path, head_width=16)
  with pytest.raises(ConfigError, match="activation='relu' is not one of"):
    clip_io.load(path, head_width=16, activation="relu")
  config = {"model_cfg": {**open_clip_config("gelu"), "text_cfg": {"act_kwargs": {
      "approximate": "tanh"}}}}
  (tmp_path / clip_io.OPEN_CLIP_CONFIG).write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="text_cfg.act_kwargs"):
    clip_io.load(path, head_width=16)
  (tmp_path / clip_io.OPEN_CLIP_CONFIG).write_text("{")
  with pytest.raises(ConfigError, match="not readable JSON"):
    clip_io.load(path, head_width=16)
  _, directory = hf_clip
  with open(os.path.join(directory, clip_io.HF_CONFIG)) as f:
    recorded = json.load(f)["text_config"]["hidden_act"]
  with pytest.raises(ConfigError, match=f"config.json records the activation '{recorded}'"):
    clip_io.load(directory, activation=OTHER_ACTIVATION[recorded])
  assert clip_io.load(directory, activation=recorded)[0].activation == recorded


def test_checkpoints_of_unknown_layouts_are_refused_in_one_line(tmp_path, hf_clip):
  torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
  with pytest.raises(ConfigError, match="not a CLIP checkpoint of a known layout"):
    clip_io.load(str(tmp_path / "other.pt"))
  with pytest.raises(ConfigError, match="no CLIP checkpoint"):
    clip_io.load(str(tmp_path / "missing.pt"))
  with pytest.raises(ConfigError, match="not a Hugging Face CLIPModel directory"):
    clip_io.load(str(tmp_path))
  _, directory = hf_clip
  with pytest.raises(ConfigError, match="pass the directory"):
    clip_io.load(os.path.join(directory, clip_io.HF_WEIGHTS))
  with open(os.path.join(directory, clip_io.HF_CONFIG)) as f:
    config = json.load(f)
  bad = tmp_path / "bad"
  bad.mkdir()
  config["text_config"]["hidden_act"] = "silu"
  (bad / clip_io.HF_CONFIG).write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="hidden_act='silu'"):
    clip_io.load(str(bad))
  with pytest.raises(ConfigError, match="head_width=64"):
    clip_io.from_openai(_open_clip_like_state(width=48), "gelu", head_width=64)
  resnet = open_clip.model.CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(
      layers=(1, 1, 1, 1), width=8, image_size=32), text_cfg=CLIPTextCfg(
          context_length=4, vocab_size=10, width=32, heads=2, layers=1))
  torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
  with pytest.raises(ConfigError, match="ResNet image tower"):
    clip_io.load(str(tmp_path / "resnet.pt"))


@pytest.mark.parametrize("tool", [build_memory, build_neighbours])
def test_the_commands_pass_the_activation_flag_on(tmp_path, tool):
  path = str(tmp_path / "model.pt")
  torch.save(open_clip.model.CLIP(**open_clip_config("gelu")).state_dict(), path)
  given = lambda activation: types.SimpleNamespace(
      retriever=path, head_width=16, clip_activation=activation,
      **{name: str(tmp_path / name) for name in ("memory", "codes", "vqgan", "out")})
  with pytest.raises(ConfigError, match="activation='relu' is not one of"):
    tool.main(given("relu"))
  with pytest.raises(ConfigError) as past_the_retriever:  # at the missing VQGAN
    tool.main(given("gelu"))
  assert "activation" not in str(past_the_retriever.value)


def _open_clip_like_state(width: int) -> dict:
  model = open_clip.model.CLIP(
      embed_dim=8, vision_cfg=CLIPVisionCfg(layers=1, width=width, head_width=16, patch_size=4,
                                            image_size=8),
      text_cfg=CLIPTextCfg(context_length=4, vocab_size=10, width=32, heads=2, layers=1))
  return {k: v.numpy() for k, v in model.state_dict().items()}


TEXTS = ["a photo of a cat", "Hello, World!!  it's  me", "naïve café — 東京 😀",
         "&amp; html &lt;tag&gt;", "don't 123 4.5e6", "", "a" * 300,
         "CM3Leon: retrieval-augmented", "ÀÉÎ ñ \u00a0 tab\tnew\nline",
         "x<|endoftext|>y <|startoftext|>", "a small red circle to the left of a large blue square"]
SPECIAL_TEXTS = ["a <start_of_text> b <end_of_text> c", "x<end_of_text>y<START_OF_TEXT>z",
                 "<<end_of_text>> <start_of_text<end_of_text>", "<end_of_text>" * 80]


def test_bpe_gives_open_clips_ids():
  ours = bpe.ClipBPE()(TEXTS + SPECIAL_TEXTS, 77)
  theirs = open_clip.get_tokenizer("ViT-B-32")(TEXTS + SPECIAL_TEXTS).numpy()
  np.testing.assert_array_equal(ours, theirs)
  assert bpe.ClipBPE().vocab_size == 49408


def test_bpe_turns_the_special_token_strings_into_their_ids():
  tokenizer = bpe.ClipBPE()
  row = tokenizer(["a <start_of_text> b <end_of_text> c"], 16)[0]
  a, b, c = (tokenizer.encode(x)[0] for x in "abc")
  assert row[:7].tolist() == [tokenizer.sot_id, a, tokenizer.sot_id, b, tokenizer.eot_id, c,
                              tokenizer.eot_id]


def test_config_refuses_inconsistent_sizes():
  good = dict(embed_dim=8, image_size=8, patch_size=4, vision_width=16, vision_layers=1,
              vision_heads=2, vision_mlp_dim=32, context_length=4, vocab_size=10, text_width=16,
              text_layers=1, text_heads=2, text_mlp_dim=32, eot_id=9)
  clip.ClipConfig(**good)
  for change, message in [(dict(patch_size=3), "does not divide clip.image_size"),
                          (dict(text_heads=3), "does not divide clip.text_width"),
                          (dict(eot_id=10), "outside the vocabulary"),
                          (dict(vision_layers=0), "positive integer"),
                          (dict(activation="relu"), "clip.activation")]:
    with pytest.raises(ConfigError, match=message):
      clip.ClipConfig(**{**good, **change})


def test_contrastive_loss_is_low_for_matched_pairs_and_symmetric():
  rng = np.random.default_rng(0)
  x = clip.l2_normalize(jnp.asarray(rng.standard_normal((6, 8)), jnp.float32))
  matched, accuracy = clip.contrastive_loss(x, x, jnp.float32(20.0))
  shuffled, _ = clip.contrastive_loss(x, x[::-1], jnp.float32(20.0))
  assert float(accuracy) == 1.0 and float(matched) < float(shuffled)
  y = clip.l2_normalize(jnp.asarray(rng.standard_normal((6, 8)), jnp.float32))
  a, _ = clip.contrastive_loss(x, y, jnp.float32(5.0))
  b, _ = clip.contrastive_loss(y, x, jnp.float32(5.0))
  assert float(a) == pytest.approx(float(b), rel=1e-6)
  logits = 5.0 * np.asarray(x) @ np.asarray(y).T
  ref = lambda l: -np.mean(np.diag(l) - np.log(np.exp(l).sum(1)))
  assert float(a) == pytest.approx(0.5 * (ref(logits) + ref(logits.T)), rel=1e-5)
