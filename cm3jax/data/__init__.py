"""Training data sources. A source yields this host's rows of every global batch as numpy arrays:
`inputs`, `targets` (int32 [rows, seq_len]), `weights` (float32 [rows, seq_len]), `position`
(int64 [rows, P]): where each row's data starts, and optionally `positions` and `segments`
(int32 [rows, seq_len]): each token's position in its document and its document's id. A stream
started at a saved position continues exactly, so a resumed run sees the batches it would have
seen.

  synthetic  random walks on a graph (cm3jax/data/synthetic.py); position = (step,)
  cm3        the CM3 stream over image-code shards (cm3jax/data/cm3.py); position = (epoch,
             index, offset). Its inputs (code shards and a text tokenizer) must exist: the
             pipeline makes them (python -m cm3jax.pipeline), or tokenize_images and
             train_tokenizer do, one command each.
  text       text-only CM3: the same stream over text records (cm3jax.tokenize_text), each
             document `</s> text`, with a vocabulary of no image codes; position as cm3's
  sft        the instruction-tuning stream over task shards (cm3jax/data/sft_stream.py);
             position = (round, index, offset). Its inputs are the task shards
             (cm3jax.tokenize_tasks) and the text tokenizer.
"""

import collections
import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files, paths
from cm3jax.core.vocab import Vocab
from cm3jax.data import code_shards, html, synthetic


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
  """Rows of step `step`: epochs are seeded permutations, so a resumed run sees the same data."""
  first = step * batch_size
  epochs = range(first // num_examples, (first + batch_size - 1) // num_examples + 1)
  order = np.concatenate([np.random.default_rng([seed, e]).permutation(num_examples)
                          for e in epochs])
  start = first - epochs[0] * num_examples
  return order[start:start + batch_size]


SOURCES = ("synthetic", "cm3", "text", "sft")
SPLITS = ("train", "validation")


def retrieved_documents(cm3, workdir: str, codes_dir: str, split: str):
  """The cm3.Retrieved of a split: its neighbour files, one beside each code file; a ConfigError
  when they are missing or were computed for other code shards."""
  from cm3jax.data import cm3 as cm3_stream  # TensorFlow is imported by the cm3 source only.
  from cm3jax.retrieval import neighbours
  directory = paths.retrieval_paths(cm3, workdir).neighbours
  manifest = neighbours.read_manifest(directory, split)
  _, counts = code_shards.shard_files(codes_dir, split)
  if manifest["codes"] != files.absolute(codes_dir) or manifest["shard_records"] != counts:
    raise ConfigError(f"the {split} neighbours in {directory} were computed for the "
                      f"{manifest['records']} records in {len(manifest['shard_records'])} files "
                      f"of {manifest['codes']}, not the {sum(counts)} in {len(counts)} of "
                      f"{files.absolute(codes_dir)}: run python -m cm3jax.build_neighbours")
  documents = cm3["retrieval"]["documents"]
  if manifest["per_record"] < documents:
    raise ConfigError(f"cm3.retrieval.documents={documents} but {directory} holds "
                      f"{manifest['per_record']} neighbours per record")
  return cm3_stream.Retrieved(neighbours.shard_paths(directory, split), manifest["per_record"],
                              documents)


@dataclasses.dataclass(frozen=True)
class Source:
  config: object
  vocab: Optional[Vocab] = None  # The cm3 and sft sources' vocabulary,
  shards: Optional[str] = None  # the image-code shards (cm3) or task shards (sft),
  workdir: Optional[str] = None  # and the run's workdir (the default retrieval paths).
  # Documents its streams have left out so far, by reason.
  left_out: collections.Counter = dataclasses.field(default_factory=collections.Counter,
                                                    compare=False)

  def batches(self, split: str, seed: Sequence[int], position: Optional[Sequence[int]] = None,
              host: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `split` from `position` (None: the start); host = (index, count)."""
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {SPLITS}")
    config = self.config
    rows = config.global_batch_size // host[1]
    if config.data == "synthetic":
      step = 0 if position is None else int(position[0])
      return synthetic.batches(config, split, step, seed, slice(host[0] * rows, (host[0] + 1) * rows))
    from cm3jax.data import cm3  # TensorFlow is imported by the cm3 and sft sources only.
    start = cm3.START if position is None else cm3.Position(*position)
    if config.data == "sft":
      from cm3jax.data import sft_stream
      return sft_stream.dataset(
          tasks_dir=self.shards, split=split, vocab=self.vocab, seq_len=config.seq_len,
          rows=rows, seed=seed, position=start, host=host[0], num_hosts=host[1],
          span_rate=config.cm3.span_rate, whole_segment_rate=config.cm3.whole_segment_rate,
          mixture=config.sft.mixture, loss_on=config.sft.loss_on,
          document_attention=config.cm3.document_attention, max_spans=config.sft.max_spans,
          skipped=self.left_out).as_numpy_iterator()
    retrieved = (retrieved_documents(config.cm3, self.workdir, self.shards, split)
                 if config.cm3.retrieval.documents else None)
    return cm3.batches(codes_dir=self.shards, split=split, vocab=self.vocab,
                       seq_len=config.seq_len, rows=rows, seed=seed,
                       position=start,
                       host=host[0], num_hosts=host[1], span_rate=config.cm3.span_rate,
                       whole_segment_rate=config.cm3.whole_segment_rate,
                       shuffle_buffer=config.cm3.shuffle_buffer,
                       document_attention=config.cm3.document_attention, retrieved=retrieved,
                       document_form=config.cm3.document_form, skipped=self.left_out)

  def unequal_shares(self, split: str, seed: Sequence[int], epoch: int, num_hosts: int) -> str:
    """A line saying how unequally `num_hosts` hosts share the records of `split` in `epoch`
    (each host reads whole files of it; cm3 and text sources), or "" when they share equally."""
    if self.config.data not in ("cm3", "text") or num_hosts == 1:
      return ""
    from cm3jax.data import cm3
    files, counts = code_shards.shard_files(self.shards, split)
    shares = cm3.host_shares(counts, epoch, seed, split, num_hosts)
    if max(shares) == min(shares):
      return ""
    return (f"the {num_hosts} hosts read {min(shares)} to {max(shares)} records of the {split} "
            f"split's {len(files)} files in epoch {epoch} ({1 - min(shares) / max(shares):.1%} "
            "fewer on the host with the fewest, whose records then recur more often)")

  def skipped(self) -> dict[str, int]:
    """Documents this source's streams have left out so far, by reason."""
    return dict(self.left_out)


MAKE_THEM = "or run every stage with python -m cm3jax.pipeline --config=CONFIG --workdir=WORKDIR"


def source(config, workdir: str) -> Source:
  """The source `config.data` names. For cm3 and sft its inputs must exist: a missing one is a
  ConfigError naming the command that makes it."""
  if config.data not in SOURCES:
    raise ConfigError(f"data={config.data!r} is not one of {list(SOURCES)}")
  if config.data == "synthetic":
    return Source(config)
  if config.cm3.document_form not in html.DOCUMENT_FORMS:
    raise ConfigError(f"cm3.document_form={config.cm3.document_form!r} is not one of "
                      f"{list(html.DOCUMENT_FORMS)}")
  inputs = paths.input_paths(config.cm3, workdir)
  if config.data == "sft":
    tasks = paths.tasks_dir(config, workdir)
    for split in SPLITS:
      if not files.exists(code_shards.manifest_path(tasks, split)):
        raise ConfigError(
            f"no complete {split} split of task records in {tasks} (sft.tasks_dir): make them "
            f"with python -m cm3jax.tokenize_tasks --vqgan_workdir={inputs.vqgan_workdir} "
            f"--out={tasks}, {MAKE_THEM}")
    return Source(config, _vocab(config, inputs, code_shards.read_manifest(tasks, "train")), tasks,
                  workdir)
  text = config.data == "text"
  make = (f"python -m cm3jax.tokenize_text --out={inputs.codes_dir} --dataset=DATASET" if text else
          f"python -m cm3jax.tokenize_images --vqgan_workdir={inputs.vqgan_workdir} "
          f"--out={inputs.codes_dir} --dataset=DATASET")
  for split in SPLITS:
    if not files.exists(code_shards.manifest_path(inputs.codes_dir, split)):
      records = "text records" if text else "image codes"
      raise ConfigError(f"no complete {split} split of {records} in {inputs.codes_dir} "
                        f"(cm3.codes_dir): make them with {make}, {MAKE_THEM}")
  manifest = code_shards.read_manifest(inputs.codes_dir, "train")
  if code_shards.is_text(manifest) != text:
    raise ConfigError(f"{inputs.codes_dir} (cm3.codes_dir) holds "
                      f"{'image codes' if text else 'text records with no image codes'}: "
                      f"data='{'cm3' if text else 'text'}' trains on them, or make "
                      f"{'text records' if text else 'image codes'} with {make}")
  if text and config.cm3.retrieval.documents:
    raise ConfigError("cm3.retrieval.documents > 0 retrieves images and captions: data='text' "
                      "has none (set it to 0)")
  return Source(config, _vocab(config, inputs, manifest), inputs.codes_dir, workdir)


def _vocab(config, inputs: paths.InputPaths, train_manifest: dict) -> Vocab:
  """The vocabulary of the text tokenizer and of the codebook `train_manifest` records."""
  if not files.exists(inputs.tokenizer):
    raise ConfigError(
        f"no text tokenizer {inputs.tokenizer} (cm3.tokenizer): train one with python -m "
        f"cm3jax.train_tokenizer --input={inputs.codes_dir} --vocab_size="
        f"{config.cm3.text_vocab_size} --out={inputs.tokenizer}, {MAKE_THEM}")
  return Vocab.from_spm_file(inputs.tokenizer, config.cm3.max_spans,
                             train_manifest["codebook_size"])
