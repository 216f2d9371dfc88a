import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3jax.config import ConfigError
from cm3jax.core.vocab import Vocab
from cm3jax.data import shapes
from cm3jax.prepare import train_tokenizer

CORPUS = ([shapes.scene("train", i).caption() for i in range(2000)]
          + ["Ünïcödé, emoji 🙂 and 中文 text", "numbers 12345 and  double  spaces "])


@pytest.fixture(scope="module")
def vocab():
  return Vocab(train_tokenizer.train(CORPUS, 320), num_sentinels=16, num_image_codes=1024)


def test_layout(vocab):
  assert vocab.text_size == 320
  assert (vocab.break_id, vocab.eoss_id, vocab.sentinel(0), vocab.sentinel(15)) == (320, 321, 322, 337)
  assert vocab.image_offset == 338 and vocab.size == 1408 and vocab.size % 128 == 0
  assert [vocab.processor.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
  ids = np.arange(vocab.size)
  kinds = vocab.is_text(ids).astype(int) + vocab.is_image(ids) + vocab.is_sentinel(ids)
  assert kinds.max() == 1 and kinds[4:vocab.image_offset + 1024].sum() == vocab.image_offset + 1024 - 6


def test_a_captioned_image_is_eos_text_break_image(vocab):
  """The one place the training document's ids are assembled (the stream, the prompts, SFT)."""
  caption, codes = "a small red circle", np.array([0, 5, 1023])
  assert vocab.encode_document([caption, codes]).tolist() == (
      [2] + vocab.encode_text(caption) + [vocab.break_id] + [338, 343, 1361])
  assert vocab.encode_document([caption]).tolist() == [2] + vocab.encode_text(caption)


def test_captions_are_whole_words(vocab):
  caption = "a small red circle above a large blue square"
  assert len(vocab.encode_text(caption)) == 9


text_segments = st.text(max_size=40)
image_segments = st.lists(st.integers(0, 1023), min_size=1, max_size=30).map(np.array)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(text_segments, image_segments), min_size=1, max_size=6))
def test_mixed_documents_round_trip_exactly(vocab, segments):
  ids = vocab.encode_document(segments)
  assert ids[0] == 2 and np.all((ids >= 0) & (ids < vocab.size))
  back = vocab.decode_document(ids)
  assert len(back) == len(segments)
  for got, want in zip(back, segments):
    if isinstance(want, str):
      assert got == want
    else:
      np.testing.assert_array_equal(got, want)


def test_json_round_trip(vocab, tmp_path):
  vocab.save(str(tmp_path / "vocab.json"))
  again = Vocab.load(str(tmp_path / "vocab.json"))
  assert again == vocab and again.to_json()["layout"]["image_offset"] == 338


def test_bad_inputs(vocab, tmp_path):
  with pytest.raises(ConfigError, match=r"image codes must lie in \[0, 1024\); got 0..1024"):
    vocab.encode_document(["a", np.array([0, 1024])])
  with pytest.raises(ConfigError, match="image codes must be integers"):
    vocab.image_tokens(np.array([0.5]))
  with pytest.raises(ConfigError, match="an image segment needs at least one code"):
    vocab.encode_document([np.array([], int)])
  with pytest.raises(ConfigError, match=r"ids \[320\] are not text pieces"):
    vocab.decode_text([5, 320])
  with pytest.raises(ConfigError, match="a document starts with </s>"):
    vocab.decode_document([5, 6])
  with pytest.raises(ConfigError, match="sentinel 16 is not in"):
    vocab.sentinel(16)
  with pytest.raises(ConfigError, match="cannot read the vocabulary"):
    Vocab.load(str(tmp_path / "missing.json"))
  with pytest.raises(ConfigError, match="not a cm3jax vocabulary"):
    Vocab.from_json({"spm_model": "AAAA"})


def test_foreign_sentencepiece_model_is_refused():
  import io

  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                 vocab_size=60, minloglevel=2)  # sentencepiece's own ids
  with pytest.raises(ConfigError, match=r"has <s>, <pad>, </s>, <unk> at ids \(1, -1, 2, 0\)"):
    Vocab(model.getvalue(), 16, 1024)
