"""Score a trained model on the shapes data: seen and held-out colour-shape compositions.

The library of `python -m cm3jax.eval_shapes` (cm3jax/eval_shapes.py)."""

from typing import Optional, Sequence

import jax

from cm3jax.config import ConfigError
from cm3jax.data import code_shards, shapes
from cm3jax.data.shapes_analyser import analyse, caption_matches
from cm3jax.eval import reports
from cm3jax.retrieval import augment, retriever
from cm3jax.run import Run
from cm3jax.sampling import defaults, engine
from cm3jax.sampling.engine import Setting

SETTINGS = {
    "greedy, no guidance": Setting(sampling=dict(greedy=True)),
    "top-p 0.9, no guidance": Setting(sampling=dict(top_p=0.9)),
    "top-p 0.9, CFG 1.5": Setting(1.5, dict(top_p=0.9)),
    "top-p 0.9, CFG 3": Setting(3.0, dict(top_p=0.9)),
    # k = 1 is Li et al.'s plausibility set (p_cond >= alpha * max p_cond). At k = 8 the set admits
    # tail codes, whose log-ratio is the largest, and a tiny model's samples turn to noise.
    "CD-K (k=1, alpha=0.1)": Setting(sampling=dict(cd_k=1, cd_alpha=0.1)),
    "top-p 0.9, best of 8 by the caption's likelihood": Setting(sampling=dict(top_p=0.9),
                                                                candidates=8),
}
RERANKED_SETTINGS = {  # where a retriever is given
    "top-p 0.9, best of 8 by the retriever's score": Setting(sampling=dict(top_p=0.9),
                                                             candidates=8, rerank_by="retriever"),
}
RETRIEVAL_SETTINGS = {  # with retrieved documents: the other definition of the unconditional stream
    "top-p 0.9, CFG 1.5, no documents in the unconditional stream": Setting(
        1.5, dict(top_p=0.9), uncond_retrieved=False),
    "top-p 0.9, CFG 3, no documents in the unconditional stream": Setting(
        3.0, dict(top_p=0.9), uncond_retrieved=False),
}
SPLITS = ("validation", "test")
REPORT_FILES = ("eval_shapes.json", "eval_shapes.md")  # in the workdir


def report_files(quantize: str = "none") -> tuple[str, ...]:
  """The report's files in the workdir: a sampler with quantized weights (`cm3jax.load(workdir,
  quantize="int8")`) writes its own (eval_shapes_int8.json, .md) beside the float one's."""
  return REPORT_FILES if quantize == "none" else tuple(
      f.replace("eval_shapes", f"eval_shapes_{quantize}") for f in REPORT_FILES)


def evaluate(run: Run, split: str, num_examples: int = 1000, batch_size: int = 128,
             seed: int = 0, settings: Optional[dict] = None,
             memory: Optional[augment.Memory] = None, retrieve: int = 0,
             reranker: Optional[retriever.Retriever] = None) -> dict:
  """Text->image accuracy per sampling setting and caption accuracy on a shapes split (test: the
  held-out compositions; validation: compositions seen in training), of the run. With
  `retrieve` > 0, each caption follows the `retrieve` documents of `memory` nearest it, and each
  image being captioned those nearest the image. `reranker` (by default
  the memory's retriever) scores the settings that rerank by the retriever."""
  if retrieve and memory is None:
    raise ConfigError(f"retrieve={retrieve} needs a memory bank")
  reranker = reranker or (memory.retriever if memory else None)
  if settings is None:
    settings = {**SETTINGS, **(RERANKED_SETTINGS if reranker else {}),
                **(RETRIEVAL_SETTINGS if retrieve else {})}
  sampler, vqgan = run.sampler, run.vqgan
  codes, captions = code_shards.read_split(run.paths.codes_dir, split, num_examples)
  truths = [shapes.described(shapes.parse_caption(c)) for c in captions]
  image_key, caption_key = jax.random.split(jax.random.PRNGKey(seed))
  results = {"split": split, "step": run.step, "examples": len(captions), "retrieved": retrieve,
             "quantize": run.quantize}
  # The ceiling of text->image: how many of the split's own codes decode to a readable image.
  readable = sum(_shown(vqgan, codes[start:start + batch_size], truths[start:start + batch_size])
                 for start in range(0, len(captions), batch_size))
  results["VQGAN reconstructions"] = readable / len(captions)
  by_text = by_image = None
  if retrieve:
    by_text = memory.context(sampler.vocab, captions, retrieve)
    by_image = memory.documents(sampler.vocab,
                                memory.retrieve_by_images(vqgan.decode(codes), retrieve))
  for name, setting in settings.items():
    if setting.rerank_by == "retriever" and setting.candidates > 1 and reranker is None:
      raise ConfigError(f"setting {name!r} reranks by the retriever, and none is given")
    score = augment.retriever_score(reranker, vqgan) if setting.rerank_by == "retriever" else None
    cfg = engine.SamplingConfig(**setting.sampling)
    right = 0
    per_batch = max(1, batch_size // setting.candidates)
    for start in range(0, len(captions), per_batch):
      batch = slice(start, start + per_batch)
      generated = engine.text_to_image_reranked(
          sampler, captions[batch], setting.candidates, vqgan.cfg.tokens_per_image,
          jax.random.split(jax.random.fold_in(image_key, start), len(captions[batch])),
          setting.guidance, cfg,
          None if by_text is None else by_text[batch], setting.uncond_retrieved, score)
      right += _shown(vqgan, generated, truths[batch])
    results[f"text_to_image, {name}"] = right / len(captions)
  right, examples = 0, []
  for start in range(0, len(captions), batch_size):
    batch = slice(start, start + batch_size)
    made = engine.caption_images(sampler, codes[batch], jax.random.fold_in(caption_key, start),
                                   context=None if by_image is None else by_image[batch])
    right += sum(caption_matches(c, t) for c, t in zip(made, truths[batch]))
    examples += made[:max(0, 8 - len(examples))]
  results["image_to_text, greedy"] = right / len(captions)
  results["caption examples"] = [f"{got!r} for {want!r}" for got, want in zip(examples, captions)]
  return results


def _shown(vqgan, codes, truths) -> int:
  """How many of these images' codes decode to an image that the analyser reads as its truth."""
  return sum(analyse(image) == truth for image, truth in zip(vqgan.decode(codes), truths))


def columns(splits: Sequence[str], retrieve: int) -> dict[str, tuple[str, int]]:
  """The report's columns, {name: (split, documents retrieved)}: each split, and with `retrieve`
  each split with retrieval."""
  out = {}
  for s in splits:
    out[s] = (s, 0)
    if retrieve:
      out[f"{s}, {retrieve} retrieved"] = (s, retrieve)
  return out


def report(run: Run, splits: Sequence[str], num_examples: int, batch_size: int = 128,
           seed: int = 0, retrieve: int = 0, retriever_path: str = "") -> dict:
  """`evaluate` of each split, and with `retrieve` of each split with retrieval from the run's
  memory bank (`cm3jax.load(workdir, memory=...)`), written to WORKDIR/eval_shapes.json (by
  column) and, as the table that `table` makes, WORKDIR/eval_shapes.md; a run with quantized
  weights writes `report_files(run.quantize)` instead, and leaves the run's sampling defaults
  (measured on the weights as trained) as they are."""
  check_splits(splits)
  if retrieve < 0:
    raise ConfigError(f"retrieve={retrieve}: retrieve 0 documents (none) or more")
  if run.vqgan is None:
    raise ConfigError(f"{run.workdir} is a text-only model: eval_shapes scores image models")
  if retrieve and run.memory_bank is None:
    raise ConfigError(f"retrieve={retrieve} needs a memory bank and {run.workdir} has none: "
                      "build one (python -m cm3jax.build_memory) or name one")
  memory = run.memory if retrieve else None
  reranker = retriever.load(retriever_path) if retriever_path else None
  results = {}
  for column, (split, retrieved) in columns(splits, retrieve).items():
    results[column] = evaluate(run, split, num_examples, batch_size, seed, memory=memory,
                               retrieve=retrieved, reranker=reranker)
  reports.write(run.workdir, report_files(run.quantize), results, table(results))
  if run.quantize == "none":
    defaults.record_sampling_defaults(run.workdir, REPORT_FILES[0], sampling_defaults(results))
  return results


def check_splits(splits: Sequence[str]):
  unknown = [s for s in splits if s not in SPLITS]
  if unknown or not splits:
    raise ConfigError(f"splits {list(splits)}: each must be one of {list(SPLITS)}")


def sampling_defaults(results: dict) -> dict[str, defaults.Measured]:
  """The best text->image setting of `results` ({column: evaluate's dict}) for each number of
  documents retrieved, {defaults.text_to_image_use(retrieved): Measured}. Without retrieval only
  the settings that need no retriever compete: sampling without documents is given none."""
  every = {**SETTINGS, **RERANKED_SETTINGS, **RETRIEVAL_SETTINGS}
  out = {}
  for retrieved in dict.fromkeys(r["retrieved"] for r in results.values()):
    rows = {f"text_to_image, {name}": s for name, s in every.items()
            if retrieved or s.candidates == 1 or s.rerank_by != "retriever"}
    found = defaults.best({c: r for c, r in results.items() if r["retrieved"] == retrieved}, rows,
                         REPORT_FILES[0])
    if found:
      out[defaults.text_to_image_use(retrieved)] = found
  return out


def saved(workdir: str) -> dict:
  """The saved report, {column: results}; {} when there is none."""
  return reports.saved(workdir, REPORT_FILES)


def table(results: dict) -> list[str]:
  """A markdown table of `results` ({column: evaluate's dict}), then some captions the model
  wrote; a setting a column did not score is "-"."""
  kinds = {"validation": "seen compositions", "test": "held-out compositions"}
  heads = [f"{r['split']} ({kinds[r['split']]}" + (f", {r['retrieved']} retrieved)"
                                                   if r.get("retrieved") else ")")
           for r in results.values()]
  rows = list(dict.fromkeys(name for r in results.values() for name, value in r.items()
                            if isinstance(value, float)))
  first = next(iter(results.values()))
  weights = f", {first['quantize']} weights" if first.get("quantize", "none") != "none" else ""
  lines = [f"eval_shapes of step {first['step']}{weights}, {first['examples']} examples per split",
           "", "| task, sampling | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
  lines += [f"| {name} | " + " | ".join(f"{r[name]:.1%}" if name in r else "-"
                                          for r in results.values()) + " |" for name in rows]
  for column, r in results.items():
    lines += ["", f"Captions of {column} images:"] + [f"- {line}" for line in r["caption examples"]]
  return lines
