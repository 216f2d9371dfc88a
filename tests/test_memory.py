"""The memory bank and the offline neighbours: contents, the retrieval strategy, resume, hosts
and bad input."""

import os
import shutil

import jax
import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.prepare import build_memory, build_neighbours
from cm3jax.retrieval import memory, mips, neighbours, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer
from tests.helpers import RecordingSampler


@pytest.fixture(scope="module")
def parts(retriever_workdir, vqgan_workdir):
  return retriever.load(retriever_workdir), ImageTokenizer.load(vqgan_workdir)


@pytest.fixture(scope="module")
def bank(parts, small_codes, tmp_path_factory):
  r, vqgan = parts
  out = str(tmp_path_factory.mktemp("bank"))
  return out, build_memory.build(r, vqgan, small_codes, "train", out, batch_size=50)


def test_the_bank_holds_every_records_document_vector(bank, parts, small_codes):
  out, manifest = bank
  r, vqgan = parts
  vectors, ids, loaded = memory.load(out)
  assert manifest == loaded and manifest["records"] == 512 and manifest["shards"] == 6
  assert manifest["shard_records"] == [100] * 5 + [12]  # one bank shard per code file
  assert vectors.dtype == np.float16 and vectors.shape == (512, r.cfg.embed_dim)
  np.testing.assert_array_equal(ids, np.arange(512))
  np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)
  rows = list(memory.records(small_codes, "train"))[300:305]
  expected = r.embed_documents([c.decode() for _, _, c, _ in rows],
                               vqgan.decode(np.stack([codes for _, _, _, codes in rows])))
  np.testing.assert_allclose(vectors[300:305], expected, atol=2e-3)
  assert manifest["retriever_fingerprint"] == r.fingerprint and manifest["skipped"] == {}


def test_the_banks_documents_are_read_by_record_id(bank, small_codes, tmp_path):
  out, manifest = bank
  rows = list(memory.records(small_codes, "train"))
  documents = memory.Documents(out, manifest)
  ids = [305, 0, 511, 99, 100, 305]
  captions, codes = documents.get(np.array(ids))
  assert captions == [rows[i][2] for i in ids] and codes.dtype == np.int32
  np.testing.assert_array_equal(codes, np.stack([rows[i][3] for i in ids]))
  assert documents.get(np.zeros(0, np.int64))[1].shape[0] == 0
  for bad in (-1, 512):
    with pytest.raises(ValueError, match=r"record ids must lie in \[0, 512\)"):
      documents.get(np.array([3, bad]))
  earlier = tmp_path / "earlier"
  shutil.copytree(out, earlier)
  old = {k: v for k, v in manifest.items() if k != "shard_records"}
  (earlier / memory.MANIFEST).write_text(__import__("json").dumps(old))
  with pytest.raises(ConfigError, match=r"^memory bank \S+ was built by an earlier cm3jax, in "
                     r"shards that are not its code files .*: rebuild it with python -m "
                     "cm3jax.build_memory --out=NEW_DIRECTORY$"):
    memory.load(str(earlier))


def test_an_interrupted_bank_resumes_with_nothing_lost_or_duplicated(bank, parts, small_codes,
                                                                     tmp_path, capsys):
  out, _ = bank
  r, vqgan = parts
  copy = str(tmp_path / "bank")
  os.makedirs(copy)
  for shard in (0, 1):  # an interrupted run: two whole shards and a partial temporary file
    os.link(memory.shard_path(out, shard), memory.shard_path(copy, shard))
  os.link(memory.settings_path(out), memory.settings_path(copy))
  open(memory.shard_path(copy, 2) + ".tmp", "wb").write(b"partial")
  manifest = build_memory.build(r, vqgan, small_codes, "train", copy, batch_size=50)
  assert "this host embeds 6, 2 already done" in capsys.readouterr().out
  a, b = memory.load(out), memory.load(copy)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert manifest["records"] == 512


def reads_of_code_files(monkeypatch) -> list[str]:
  """The code files memory.records opens from now on, by name."""
  import tensorflow as tf
  opened, real = [], tf.data.TFRecordDataset
  monkeypatch.setattr(tf.data, "TFRecordDataset", lambda paths, *a, **k: opened.extend(
      os.path.basename(p) for p in ([paths] if isinstance(paths, str) else paths))
      or real(paths))
  return opened


def test_hosts_embed_disjoint_code_files_that_make_the_whole_bank(bank, parts, small_codes,
                                                                  tmp_path, monkeypatch):
  r, vqgan = parts
  out = str(tmp_path / "bank")
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(build_memory.multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  opened = reads_of_code_files(monkeypatch)
  with pytest.raises(FileNotFoundError):  # host 1 alone: host 0's shards are missing
    build_memory.build(r, vqgan, small_codes, "train", out, batch_size=50)
  assert memory.done_shards(out) == {1, 3, 5}
  assert opened == ["train-00001.tfrecord", "train-00003.tfrecord", "train-00005.tfrecord"]
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  build_memory.build(r, vqgan, small_codes, "train", out, batch_size=50)
  assert memory.done_shards(out) == {0, 1, 2, 3, 4, 5}
  np.testing.assert_array_equal(memory.load(out)[0], memory.load(bank[0])[0])
  np.testing.assert_array_equal(memory.load(out)[1], memory.load(bank[0])[1])


def other_weights(params):
  return jax.tree.map(lambda p: np.asarray(p) * 1.01, params)


def test_a_bank_refuses_another_retriever_dimension_or_codes(bank, parts, small_codes, tmp_path):
  out, manifest = bank
  r, _ = parts
  with pytest.raises(ConfigError, match="built by another retriever"):
    memory.check_compatible({**manifest, "retriever_fingerprint": "0" * 16}, out, r)
  with pytest.raises(ConfigError, match="holds 8-dimensional vectors; this retriever embeds in 32"):
    memory.check_compatible({**manifest, "dim": 8}, out, r)
  other = tmp_path / "codes"
  other.mkdir()
  (other / "train.json").write_text('{"records": 100}')
  with pytest.raises(ConfigError, match=rf"memory bank {out} of the train split: made with "
                     rf"codes='{small_codes}' \(this run: '{other}'\), codes_fingerprint='\w+' "
                     r"\(this run: None\), codes_records=512 \(this run: 100\)"):
    memory.check_covers(manifest, out, str(other))
  with pytest.raises(ConfigError, match="holds no complete memory bank"):
    memory.load(str(tmp_path))


def test_a_bank_made_otherwise_is_neither_resumed_nor_reused(bank, parts, small_codes, tmp_path):
  """Before, a bank killed after 2 of 4 shards and resumed with another --retriever mixed two
  retrievers' vectors under a bank.json that named the second."""
  out, _ = bank
  r, vqgan = parts
  partial = str(tmp_path / "bank")
  os.makedirs(partial)
  for shard in (0, 1):  # what a kill after shard 2 leaves
    os.link(memory.shard_path(out, shard), memory.shard_path(partial, shard))
  os.link(memory.settings_path(out), memory.settings_path(partial))
  other_codes = str(tmp_path / "codes")
  shutil.copytree(small_codes, other_codes)
  another = {
      "retriever_fingerprint": dict(r=retriever.Retriever(r.cfg, other_weights(r.params),
                                                          r.tokenize, "another CLIP")),
      "vqgan": dict(vqgan=ImageTokenizer(vqgan.cfg, other_weights(vqgan.params), vqgan.step)),
      "split": dict(split="validation"), "codes": dict(codes_dir=other_codes)}
  for field, change in another.items():
    args = {"r": r, "vqgan": vqgan, "codes_dir": small_codes, "split": "train", **change}
    for where, what in ((partial, f"the 2 shards of memory bank {partial}"),
                        (out, f"memory bank {out}")):
      with pytest.raises(ConfigError, match=rf"^{what}: made with {field}=\S+ \(this run: \S+\)"
                         r"[^;]*; run with the retriever, VQGAN, codes and settings it was made"):
        build_memory.build(out=where, batch_size=50, **args)
  assert memory.done_shards(partial) == {0, 1}
  manifest = build_memory.build(r, vqgan, small_codes, "train", partial, 50)
  assert manifest["records"] == 512 and manifest == memory.read_manifest(out)


def test_faiss_missing_is_one_line(monkeypatch):
  import builtins
  real_import = builtins.__import__
  monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (
      (_ for _ in ()).throw(ImportError(name)) if name == "faiss" else real_import(name, *a, **k)))
  with pytest.raises(ConfigError, match="need faiss-cpu"):
    mips.make_index("faiss_flat", np.eye(4, dtype=np.float32), np.arange(4))


def test_pick_follows_the_papers_strategy():
  rng = np.random.default_rng(0)
  for _ in range(200):
    Q, C, m = 3, 6, 3
    text_ids, image_ids = rng.integers(-1, 10, (Q, C)), rng.integers(-1, 10, (Q, C))
    text_scores, image_scores = rng.uniform(0.5, 1.0, (Q, C)), rng.uniform(0.5, 1.0, (Q, C))
    query_ids = rng.integers(0, 10, Q)
    documents = rng.normal(size=(10, 8))
    documents[[3, 7]] = documents[2] + 0.01 * rng.normal(size=(2, 8))  # 2, 3 and 7: one content
    documents /= np.linalg.norm(documents, axis=1, keepdims=True)
    picked = neighbours.pick(query_ids, text_scores, text_ids, image_scores, image_ids, documents,
                             m)
    for q in range(Q):
      chosen = [int(i) for i in picked[q] if i >= 0]
      assert list(picked[q][len(chosen):]) == [-1] * (m - len(chosen))  # -1 only at the end
      assert len(set(chosen)) == len(chosen) and query_ids[q] not in chosen
      assert len({2, 3, 7} & set(chosen)) <= 1  # never two documents of one content
      # Exactly the survivors, in the order text 1, image 1, text 2, ...
      order = [(int(ids[q, k]), s[q, k]) for k in range(C)
               for s, ids in ((text_scores, text_ids), (image_scores, image_ids))]
      survivors = []
      for i, score in order:
        if (i >= 0 and i != query_ids[q] and score <= 0.9
            and all(documents[i] @ documents[j] <= 0.9 for j in survivors)):
          survivors.append(i)
      assert chosen == survivors[:m]


def test_query_dropout_drops_the_asked_share_and_keeps_the_end():
  rng = np.random.default_rng(0)
  tokens = np.zeros((2000, 12), np.int32)
  tokens[:, :10] = np.arange(1, 11)
  tokens[:, 10] = 99
  same = neighbours.drop_tokens(tokens, 99, 0.0, rng)
  np.testing.assert_array_equal(same, tokens)
  dropped = neighbours.drop_tokens(tokens, 99, 0.2, rng)
  kept = (dropped > 0) & (dropped != 99)
  assert kept.sum(1).mean() == pytest.approx(8.0, abs=0.15)
  for row in dropped[:50]:
    end = int(np.argmax(row == 99))
    assert list(row[:end]) == sorted(row[:end]) and (row[end + 1:] == 0).all()


@pytest.fixture(scope="module")
def neighbour_dir(bank, parts, small_codes, tmp_path_factory):
  out, manifest = bank
  r, vqgan = parts
  vectors, ids, _ = memory.load(out)
  index = mips.make_index("exact", vectors, ids)
  documents = build_neighbours.documents_by_id(vectors, ids)
  directory = str(tmp_path_factory.mktemp("neighbours"))
  for split in ("train", "validation"):
    build_neighbours.build_split(r, vqgan, index, documents, {**manifest, "path": out},
                                 small_codes, split, directory, per_record=3, candidates=8)
  return directory


def test_neighbours_are_relevant_distinct_and_never_the_record_itself(neighbour_dir, bank, parts,
                                                                      small_codes):
  keys, ids, manifest = neighbours.read(neighbour_dir, "train")
  assert len(keys) == 512 and ids.shape == (512, 3) and manifest["shards"] == 6
  assert manifest["shard_records"] == [100] * 5 + [12]  # one file per code file
  assert keys[7] == b"train/7"
  assert (ids[:, 0] >= 0).mean() > 0.9
  for row, chosen in enumerate(ids):
    chosen = chosen[chosen >= 0]
    assert row not in chosen and len(set(chosen)) == len(chosen)
  r, vqgan = parts
  vectors = memory.load(bank[0])[0].astype(np.float32)
  rows = list(memory.records(small_codes, "train"))[:20]
  image_queries = r.embed_images(vqgan.decode(np.stack([c for *_, c in rows])))
  for q in range(20):  # an image's pick is one of its own top candidates and not > 0.9
    relevance = image_queries[q] @ vectors[ids[q]].T
    assert (relevance <= 0.9 + 2e-3).all()
  val_keys, val_ids, _ = neighbours.read(neighbour_dir, "validation")
  assert len(val_keys) == 128 and (val_ids[:, 0] >= 0).mean() > 0.9


def test_each_neighbour_file_holds_the_documents_of_its_code_files_neighbours(
    neighbour_dir, small_codes):
  import tensorflow as tf
  rows = list(memory.records(small_codes, "train"))
  _, ids, manifest = neighbours.read(neighbour_dir, "train")
  parse = neighbours.parser(3, manifest["tokens_per_image"])
  for shard in (0, 5):
    path = neighbours.shard_path(neighbour_dir, "train", shard)
    found = list(tf.data.TFRecordDataset(path).map(parse).as_numpy_iterator())
    assert len(found) == manifest["shard_records"][shard]
    for row, near in enumerate(found):
      record = shard * 100 + row
      chosen = ids[record][ids[record] >= 0]
      assert near["key"] == rows[record][1] and list(near["ids"]) == list(ids[record])
      assert list(near["captions"]) == [rows[i][2] for i in chosen]
      np.testing.assert_array_equal(near["codes"], np.stack([rows[i][3] for i in chosen])
                                    .reshape(len(chosen), -1))


def test_hosts_build_the_neighbours_of_disjoint_code_files(neighbour_dir, bank, parts,
                                                           small_codes, tmp_path, monkeypatch):
  out, manifest = bank
  r, vqgan = parts
  vectors, ids, _ = memory.load(out)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(build_neighbours.multihost_utils, "sync_global_devices", lambda name: None)
  where = str(tmp_path / "n")
  for host in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda: host)
    opened = reads_of_code_files(monkeypatch)
    build_neighbours.build_split(r, vqgan, mips.make_index("exact", vectors, ids),
                                 build_neighbours.documents_by_id(vectors, ids),
                                 {**manifest, "path": out}, small_codes, "train", where,
                                 per_record=3, candidates=8)
    assert opened == [f"train-{s:05d}.tfrecord" for s in range(host, 6, 2)]
    assert os.path.exists(neighbours.manifest_path(where, "train")) == (host == 0)
  for a, b in zip(neighbours.read(neighbour_dir, "train"), neighbours.read(where, "train")):
    if isinstance(a, np.ndarray):
      np.testing.assert_array_equal(a, b)


def test_interrupted_neighbours_resume_identically(neighbour_dir, bank, parts, small_codes,
                                                   tmp_path):
  out, manifest = bank
  r, vqgan = parts
  copy = str(tmp_path / "n")
  os.makedirs(copy)
  os.link(neighbours.shard_path(neighbour_dir, "train", 0),
          neighbours.shard_path(copy, "train", 0))
  os.link(neighbours.settings_path(neighbour_dir, "train"), neighbours.settings_path(copy, "train"))
  vectors, ids, _ = memory.load(out)
  build_neighbours.build_split(r, vqgan, mips.make_index("exact", vectors, ids),
                               build_neighbours.documents_by_id(vectors, ids),
                               {**manifest, "path": out}, small_codes, "train", copy,
                               per_record=3, candidates=8)
  a, b = neighbours.read(neighbour_dir, "train"), neighbours.read(copy, "train")
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_neighbours_made_otherwise_are_neither_resumed_nor_reused(neighbour_dir, bank, parts,
                                                                 small_codes, tmp_path):
  """Before, a rerun into a folder with another retriever and bank kept the old shards under a
  manifest naming the new ones, and one with --per_record=2 recorded 2 over shards of 3."""
  out, manifest = bank
  r, vqgan = parts
  partial = str(tmp_path / "n")
  os.makedirs(partial)
  os.link(neighbours.shard_path(neighbour_dir, "train", 0),  # what a kill after shard 1 leaves
          neighbours.shard_path(partial, "train", 0))
  os.link(neighbours.settings_path(neighbour_dir, "train"),
          neighbours.settings_path(partial, "train"))
  another_bank = {**manifest, "path": out, "fingerprint": "0" * 16,
                  "retriever_fingerprint": "1" * 16}
  another = {
      "bank_fingerprint": dict(bank=another_bank),
      "vqgan": dict(vqgan=ImageTokenizer(vqgan.cfg, other_weights(vqgan.params), vqgan.step)),
      "per_record": dict(per_record=2), "candidates": dict(candidates=16),
      "query_dropout": dict(query_dropout=0.1), "max_relevance": dict(max_relevance=0.8),
      "seed": dict(seed=1)}
  for field, change in another.items():
    args = {"vqgan": vqgan, "bank": {**manifest, "path": out}, "per_record": 3, "candidates": 8,
            **change}
    for where, what in ((partial, f"the 1 train neighbour files in {partial}"),
                        (neighbour_dir, f"the train neighbours in {neighbour_dir}")):
      with pytest.raises(ConfigError, match=rf"^{what}: made with {field}=\S+ \(this run: \S+\)"
                         r"[^;]*; run with the bank, VQGAN, codes and settings they were made"):
        build_neighbours.build_split(r, index=None, documents_NxE=None, codes_dir=small_codes,
                                     split="train", out=where, **args)
  assert neighbours.done_shards(partial, "train") == {0}
  assert not os.path.exists(neighbours.manifest_path(partial, "train"))


def test_the_pipeline_refuses_its_own_bank_or_neighbours_made_otherwise(
    neighbour_dir, bank, retriever_workdir, vqgan_workdir, small_codes, tmp_path):
  from cm3jax.jobs import pipeline
  from tests.helpers import tiny_config
  out, _ = bank
  shutil.copytree(out, tmp_path / "memory")
  shutil.copytree(neighbour_dir, tmp_path / "neighbours")
  job = lambda codes=small_codes, **retrieval: pipeline.Job(tiny_config(data="cm3", **{
      "cm3.vqgan_workdir": vqgan_workdir, "cm3.codes_dir": str(codes),
      "cm3.retrieval.documents": 3, "cm3.retrieval.retriever": retriever_workdir,
      "cm3.retrieval.per_record": 3, "cm3.retrieval.candidates": 8,
      **{f"cm3.retrieval.{k}": v for k, v in retrieval.items()}}), str(tmp_path))
  assert pipeline.memory_status(job())[0] == pipeline.COMPLETE
  other_codes = tmp_path / "codes"
  shutil.copytree(small_codes, other_codes)
  with pytest.raises(ConfigError, match=rf"^the memory bank {tmp_path}/memory: made with "
                     rf"codes='{small_codes}' \(this run: '{other_codes}'\); delete it for the "
                     "pipeline"):
    pipeline.memory_status(job(other_codes))
  assert pipeline.neighbours_status(job(memory=out))[0] == pipeline.COMPLETE
  with pytest.raises(ConfigError, match=rf"^the train neighbours in {tmp_path}/neighbours: made "
                     r"with per_record=3 \(this run: 2\); delete it for the pipeline"):
    pipeline.neighbours_status(job(memory=out, per_record=2))
  with pytest.raises(ConfigError, match=r": made with bank='\S+' \(this run: '\S+/memory'\);"):
    pipeline.neighbours_status(job())


def test_query_dropout_reaches_the_text_queries_at_the_recorded_rate(bank, parts, small_codes,
                                                                      tmp_path, monkeypatch):
  out, manifest = bank
  r, vqgan = parts
  queries = []
  embed_tokens = r.embed_tokens
  monkeypatch.setattr(r, "embed_tokens", lambda tokens: queries.append(tokens) or
                      embed_tokens(tokens))
  vectors, ids, _ = memory.load(out)
  info = build_neighbours.build_split(
      r, vqgan, mips.make_index("exact", vectors, ids),
      build_neighbours.documents_by_id(vectors, ids), {**manifest, "path": out}, small_codes,
      "validation", str(tmp_path), per_record=3, candidates=8)
  assert info["query_dropout"] == 0.2
  texts = [caption.decode() for _, _, caption, _ in memory.records(small_codes, "validation")]
  length = lambda tokens_BxC: np.argmax(tokens_BxC == r.cfg.eot_id, axis=1).sum()
  kept = length(np.concatenate(queries)) / length(r.tokenize(texts, r.cfg.context_length))
  assert kept == pytest.approx(1 - info["query_dropout"], abs=0.05)


def test_sampling_context_is_the_retrieved_documents_best_first(bank, parts, small_codes):
  from cm3jax.core.vocab import Vocab
  from cm3jax.prepare import train_tokenizer
  from cm3jax.retrieval import augment
  out, _ = bank
  r, _ = parts
  found = augment.Memory.load(out)
  assert found.retriever.fingerprint == r.fingerprint
  rows = list(memory.records(small_codes, "train"))
  vocab = Vocab(train_tokenizer.train([c.decode() for _, _, c, _ in rows], 300),
                num_sentinels=16, num_image_codes=64)
  texts = ["a small red circle on the left", "a large blue square above a small green circle"]
  ids = found.retrieve(texts, 2)
  vectors = memory.load(out)[0].astype(np.float32)
  scores = r.embed_texts(texts) @ vectors.T
  np.testing.assert_array_equal(ids[:, 0], scores.argmax(1))
  context = found.context(vocab, texts, 2)
  for row, tokens in zip(ids, context):
    expected = np.concatenate([vocab.encode_document([rows[i][2].decode(), rows[i][3]])
                               for i in row])
    np.testing.assert_array_equal(tokens, expected)
  with pytest.raises(ConfigError, match="retrieve at least 1"):
    found.context(vocab, texts, 0)


@pytest.mark.parametrize("in_uncond", [True, False])
def test_text_to_image_places_the_context_before_the_prompt(in_uncond):
  import jax

  from cm3jax.core.vocab import Vocab
  from cm3jax.data import shapes
  from cm3jax.prepare import train_tokenizer
  from cm3jax.sampling import engine
  vocab = Vocab(train_tokenizer.train([shapes.scene("train", i).caption() for i in range(300)],
                                      300), num_sentinels=16, num_image_codes=64)
  sampler = RecordingSampler(vocab)
  context = [np.array([2, 10, 11], np.int32), np.array([2, 12], np.int32)]
  captions = ["a small red circle on the left", "a large blue square at the top"]
  engine.text_to_image(sampler, captions, 2, 4, jax.random.PRNGKey(0), 3.0,
                         context=context, context_in_uncond=in_uncond)
  assert len(sampler.requests) == 4
  for n, request in enumerate(sampler.requests):
    i = n // 2
    np.testing.assert_array_equal(
        request.prompt, np.concatenate([context[i], engine.image_prompt(vocab, captions[i])]))
    kept = context[i] if in_uncond else np.zeros(0, np.int32)
    np.testing.assert_array_equal(request.uncond_prompt, np.concatenate(
        [kept, engine.unconditional_image_prompt(vocab)]))
  with pytest.raises(ConfigError, match="1 contexts for 2 captions"):
    engine.text_to_image(sampler, captions, 1, 4, jax.random.PRNGKey(0), context=context[:1])


class CountingSampler(RecordingSampler):
  """Stands in for a Sampler: request n draws image code n at every position."""

  def generate(self, requests, num_new, mode, sampling_config):
    first = len(self.requests)
    self.requests.extend(requests)
    codes = np.arange(first, first + len(requests))[:, None].repeat(num_new, 1)
    return (self.vocab.image_offset + codes).astype(np.int32)


def test_reranking_keeps_the_candidate_the_score_rates_highest(monkeypatch):
  import jax

  from cm3jax.core.vocab import Vocab
  from cm3jax.data import shapes
  from cm3jax.prepare import train_tokenizer
  from cm3jax.sampling import engine
  vocab = Vocab(train_tokenizer.train([shapes.scene("train", i).caption() for i in range(300)],
                                      300), num_sentinels=16, num_image_codes=64)
  captions = ["a small red circle on the left", "a large blue square at the top"]
  context = [np.array([2, 10, 11], np.int32), np.array([2, 12], np.int32)]
  preferred = {0: 2, 1: 1}  # caption -> the candidate code the score likes best
  seen = []

  def score(codes_NxT, texts):
    seen.append(list(texts))
    return np.array([-abs(int(c[0]) - preferred[captions.index(t)] - 4 * captions.index(t))
                     for c, t in zip(codes_NxT, texts)], np.float32)

  sampler = CountingSampler(vocab)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  kept = engine.text_to_image_reranked(sampler, captions, 4, 3, keys, 3.0,
                                         context=context, context_in_uncond=False, score=score)
  # caption i's candidates are codes 4i .. 4i + 3; the score wants 4i + preferred[i]
  np.testing.assert_array_equal(kept, [[2, 2, 2], [5, 5, 5]])
  assert seen == [[captions[0]] * 4 + [captions[1]] * 4]
  for request in sampler.requests:  # the context reaches the prompt, not the unconditional stream
    assert request.prompt[:2].tolist() == [2, 10] or request.prompt[:2].tolist() == [2, 12]
    np.testing.assert_array_equal(request.uncond_prompt, engine.unconditional_image_prompt(vocab))
  # the default score is the model's own likelihood of the caption
  monkeypatch.setattr(engine, "caption_log_likelihood",
                      lambda s, codes, texts: score(codes, texts))
  np.testing.assert_array_equal(engine.text_to_image_reranked(
      CountingSampler(vocab), captions, 4, 3, keys), [[2, 2, 2], [5, 5, 5]])


def test_captioning_places_the_context_before_the_caption_prompt():
  import jax

  from cm3jax.core.vocab import Vocab
  from cm3jax.data import shapes
  from cm3jax.prepare import train_tokenizer
  from cm3jax.sampling import engine
  vocab = Vocab(train_tokenizer.train([shapes.scene("train", i).caption() for i in range(300)],
                                      300), num_sentinels=16, num_image_codes=64)
  sampler = RecordingSampler(vocab)
  codes = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  context = [np.array([2, 10, 11], np.int32), np.array([2, 12], np.int32)]
  engine.caption_images(sampler, codes, jax.random.PRNGKey(0), context=context)
  for request, before, c in zip(sampler.requests, context, codes):
    np.testing.assert_array_equal(request.prompt,
                                  np.concatenate([before, engine.caption_prompt(vocab, c)]))
  with pytest.raises(ConfigError, match="1 contexts for 2 images"):
    engine.caption_images(sampler, codes, jax.random.PRNGKey(0), context=context[:1])


def test_the_retriever_score_is_each_decoded_images_cosine_to_its_caption(parts, small_codes):
  from cm3jax.retrieval import augment
  r, vqgan = parts
  rows = list(memory.records(small_codes, "validation"))[:64]
  codes = np.stack([c for _, _, _, c in rows])
  captions = [c.decode() for _, _, c, _ in rows]
  score = augment.retriever_score(r, vqgan)(codes, captions)
  cosines = r.embed_texts(captions) @ r.embed_images(vqgan.decode(codes)).T
  np.testing.assert_allclose(score, np.diag(cosines), rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="63 texts for 64 images"):
    r.image_text_scores(captions[1:], vqgan.decode(codes))


def test_a_bank_of_a_state_dict_clip_reloads_its_retriever_as_it_was_made(parts, small_codes,
                                                                           tmp_path):
  """A state dict records neither its heads nor its activation; the bank records both, and
  refuses the same weights under another activation."""
  import open_clip
  import torch

  from cm3jax.retrieval import augment
  _, vqgan = parts
  model = open_clip.model.CLIP(
      embed_dim=16, quick_gelu=False,
      vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
      text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
  path = str(tmp_path / "gelu.pt")
  torch.save(model.state_dict(), path)
  made_with = retriever.load(path, head_width=16, activation="gelu")
  out = str(tmp_path / "bank")
  build_memory.build(made_with, vqgan, small_codes, "train", out, batch_size=128)
  found = augment.Memory.load(out)
  assert found.retriever.cfg.activation == "gelu" and found.retriever.cfg.text_heads == 2
  assert found.retriever.fingerprint == made_with.fingerprint
  with pytest.raises(ConfigError, match="retriever_activation='gelu' \\(this run: 'quick_gelu'\\)"):
    augment.Memory.load(out, path, head_width=16, activation="quick_gelu")
