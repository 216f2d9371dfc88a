"""What made an output: a field recorded otherwise is refused, one the record lacks is unknown."""

import pytest

from cm3jax.config import ConfigError
from cm3jax.core import provenance


def test_a_field_recorded_otherwise_is_refused_naming_it():
  recorded = {"dataset": "shapes/small", "shard_size": 64, "tokens": [4, 4]}
  made_by = {"dataset": "shapes/small", "shard_size": 100, "tokens": (4, 4)}
  assert provenance.differences(recorded, made_by) == ["shard_size=64 (this run: 100)"]
  with pytest.raises(ConfigError, match=r"^codes in C: made with shard_size=64 \(this run: "
                                        r"100\); write to a new --out$"):
    provenance.check(recorded, made_by, "codes in C", "write to a new --out")


def test_a_field_the_record_lacks_is_unknown_so_older_outputs_are_reused():
  """An output made before cm3jax recorded a field (a bank's retriever activation, say)."""
  made_by = {"dataset": "shapes/small", "vqgan": "0123456789abcdef"}
  assert provenance.differences({"dataset": "shapes/small"}, made_by) == []
  provenance.check({"dataset": "shapes/small"}, made_by, "codes", "")
  assert provenance.differences({"dataset": "coco"}, made_by) == [
      "dataset='coco' (this run: 'shapes/small')"]


def test_a_resume_needs_the_record_its_first_piece_left(tmp_path):
  path = str(tmp_path / "train.settings.json")
  provenance.start(path, {"shard_size": 64}, "codes", started=False, remedy="")
  provenance.start(path, {"shard_size": 64}, "codes", started=True, remedy="")
  with pytest.raises(ConfigError, match=r"made with shard_size=64 \(this run: 32\)"):
    provenance.start(path, {"shard_size": 32}, "codes", started=True, remedy="")
  with pytest.raises(ConfigError, match="no record of what made them"):
    provenance.start(str(tmp_path / "none.json"), {"shard_size": 64}, "codes", started=True,
                     remedy="")
