"""The synthetic source on several hosts: each host yields its own rows of every global batch."""

import itertools

import numpy as np
import pytest

from cm3jax import data
from tests.helpers import tiny_config


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_the_hosts_rows_are_the_global_batch_in_host_order(num_hosts):
  source = data.source(tiny_config(global_batch_size=6), "")
  for split, position in (("train", None), ("train", (5,)), ("validation", None)):
    read = lambda host: list(itertools.islice(source.batches(split, (0, 1), position, host), 3))
    shares = [read((h, num_hosts)) for h in range(num_hosts)]
    for step, whole in enumerate(read((0, 1))):
      assert len({tuple(row) for row in whole["inputs"]}) == 6  # six different rows
      for key in whole:
        np.testing.assert_array_equal(np.concatenate([share[step][key] for share in shares]),
                                      whole[key], err_msg=key)
