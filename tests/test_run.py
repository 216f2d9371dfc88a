"""The library API (cm3jax/run.py) on an untrained run: each method gives what the sampler and
the VQGAN give for the same request, in a person's shapes, and a bad request is a RequestError
(tests/jobs/test_main_job.py draws from a trained run with its measured setting)."""

import jax
import numpy as np
import pytest

import cm3jax
from cm3jax.sampling import engine, instruct

CAPTIONS = ["a red circle above a blue square", "a small green triangle"]


@pytest.fixture(scope="module")
def run(untrained_workdir):
  return cm3jax.load(untrained_workdir)


@pytest.fixture(scope="module")
def images(run):
  return run.text_to_image(CAPTIONS, num_images=2, seed=3)


def test_a_loaded_run_binds_its_step_vocabulary_and_vqgan(run, vqgan_workdir):
  assert run.step == 6 and run.vocab.num_image_codes == 64
  assert run.paths.vqgan_workdir == vqgan_workdir and run.vqgan.cfg.resolution == 32
  assert run.memory_bank is None
  with pytest.raises(cm3jax.RequestError, match="has no memory bank"):
    run.retrieve(CAPTIONS)


def test_text_to_image_draws_each_caption_from_one_key(run, images):
  assert images.dtype == np.uint8 and images.shape == (2, 2, 32, 32, 3)
  assert not np.array_equal(images[0], images[1])
  codes = engine.text_to_image(run.sampler, [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2, 1, 16,
                               jax.random.PRNGKey(3), 1.0, engine.SamplingConfig(greedy=True))
  np.testing.assert_array_equal(images.reshape(4, 32, 32, 3), run.vqgan.decode(codes[:, 0]))


def test_captions_tasks_and_text_equal_the_engines(run, images):
  key, codes = jax.random.PRNGKey(0), run.vqgan.encode(images[0])
  assert run.caption(images[0]) == engine.caption_images(run.sampler, codes, key)
  assert run.vqa(images[0], ["what colour?", "how many?"]) == instruct.vqa(
      run.sampler, codes, ["what colour?", "how many?"], key)
  np.testing.assert_array_equal(run.image2seg(images[0]), run.vqgan.decode(instruct.image2seg(
      run.sampler, codes, key)))
  np.testing.assert_array_equal(
      run.edit(images[0], ["make it blue", "make it red"], image_guidance=1.5, text_guidance=3.0),
      run.vqgan.decode(instruct.edit(run.sampler, codes, ["make it blue", "make it red"], key,
                                     1.5, 3.0, engine.SamplingConfig(greedy=True))))
  objects = [[("circle", (0, 0, 16, 16))], [("square", (8, 8, 32, 32))]]
  np.testing.assert_array_equal(
      run.grounded(CAPTIONS, objects, guidance=2.0),
      run.vqgan.decode(instruct.grounded(run.sampler, CAPTIONS, [[("circle", [0, 0, 16, 16])],
                                                                 [("square", [8, 8, 32, 32])]],
                                         16, key, 2.0, engine.SamplingConfig(greedy=True))))
  np.testing.assert_array_equal(
      run.seg2image(images[0], CAPTIONS), run.vqgan.decode(instruct.seg2image(
          run.sampler, codes, CAPTIONS, key, 1.0, engine.SamplingConfig(greedy=True))))
  assert run.infill_text(["a red <mask> above a blue square"]) == engine.infill_text(
      run.sampler, ["a red <mask> above a blue square"], key, sampling=engine.SamplingConfig(
          top_p=0.9))
  assert all(isinstance(t, str) for t in run.continue_text(["a red"]))


@pytest.mark.parametrize("box, span", [
    ((8, 8, 24, 16), (5, 7)),  # row 1, columns 1 and 2 of the 4 x 4 codes
    ((0, 0, 32, 32), (0, 16)),
    ((9, 9, 10, 10), (5, 6)),
    ((16, 0, 24, 8), (2, 3)),
    ((4, 4, 12, 28), (0, 14)),  # rows 0 to 3, columns 0 to 1: the span ends at row 3's column 1
])
def test_infill_draws_the_span_of_codes_that_covers_the_box(run, images, monkeypatch, box, span):
  asked = []

  def infill_image(sampler, caption, codes, start, end, key, sampling):
    asked.append((caption, start, end))
    return codes
  monkeypatch.setattr(engine, "infill_image", infill_image)
  filled = run.infill(images[0, 0], box, "a red circle")
  assert asked == [("a red circle", *span)]
  np.testing.assert_array_equal(filled, run.vqgan.decode(run.vqgan.encode(images[0, :1]))[0])


@pytest.mark.parametrize("call, message", [
    (lambda r, im: r.text_to_image([]), "non-empty list of strings"),
    (lambda r, im: r.text_to_image("a red circle"), "non-empty list of strings"),
    (lambda r, im: r.text_to_image([1]), "non-empty list of strings"),
    (lambda r, im: r.text_to_image(CAPTIONS, num_images=0), "must be at least 1"),
    (lambda r, im: r.text_to_image(CAPTIONS, retrieve=-1), "retrieve at least 0"),
    (lambda r, im: r.caption(im[0].astype(np.float32)), "images must be uint8"),
    (lambda r, im: r.caption(im[0, 0, 0]), "images must be uint8"),
    (lambda r, im: r.caption(im[:0, 0]), "images must be uint8"),
    (lambda r, im: r.vqa(im[0], ["one question for two images"]), "2 images but 1 texts"),
    (lambda r, im: r.grounded(CAPTIONS, [[]]), "2 captions but 1 lists of objects"),
    (lambda r, im: r.infill(im[0], (0, 0, 8, 8), "a"), "infill takes one image"),
    (lambda r, im: r.infill(im[0, 0], (8, 8, 8, 16), "a"), "is not x0 < x1 <= 32"),
    (lambda r, im: r.infill(im[0, 0], (0, 0, 8, 40), "a"), "is not x0 < x1 <= 32"),
    (lambda r, im: r.infill_text(["no mask here"]), "one <mask>"),
])
def test_a_bad_request_is_a_one_line_request_error(run, images, call, message):
  with pytest.raises(cm3jax.RequestError, match=message) as refused:
    call(run, images)
  assert isinstance(refused.value, ValueError) and "\n" not in str(refused.value)
