"""Shard encoding and the statistics reduced across shards."""

from __future__ import annotations

import numpy as np
import pytest

from flows.shards import FieldStats, decode_shard, encode_shard, field_array, sha256


@pytest.mark.parametrize("cuts", [[0, 1000], [0, 1, 999, 1000], [0, 10, 10, 500, 1000]])
def test_merged_statistics_equal_numpy_over_all_values(cuts):
    rng = np.random.default_rng(3)
    values = rng.normal(5.0, 3.0, size=1000) ** 3  # skewed, large spread
    total = FieldStats()
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        total = total.merge(FieldStats.of(values[lo:hi]))
    assert total.count == values.size
    assert total.mean == pytest.approx(values.mean(), rel=1e-12)
    assert total.std == pytest.approx(values.std(), rel=1e-10)
    assert (total.min, total.max) == (values.min(), values.max())


def test_empty_partials_do_not_change_the_result():
    s = FieldStats.of(np.arange(5.0))
    assert FieldStats().merge(s) == s
    assert s.merge(FieldStats()) == s


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shard_round_trip_keeps_shape_dtype_and_values(dtype):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 5, 7))  # (rows, nt, nx)
    data = encode_shard([4, 5, 6], ["a", "b", "c"], [{"nu": 0.1}] * 3, {"u": u}, dtype)
    table = decode_shard(data)
    back = field_array(table, "u")
    assert back.shape == (3, 5, 7) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, u.astype(dtype))
    assert table.column("sample_id").to_pylist() == [4, 5, 6]
    assert dict(table.column("parameters").to_pylist()[0]) == {"nu": 0.1}
    assert table.schema.field("u").type.shape == [5, 7]
    # zstd-compressed Parquet, deterministic bytes for equal input
    assert data[:4] == b"PAR1"
    assert sha256(data) == sha256(
        encode_shard([4, 5, 6], ["a", "b", "c"], [{"nu": 0.1}] * 3, {"u": u}, dtype)
    )
