"""The fast column and streaming helpers the post-processing stages stand on: radix argsort, segment order,
codes of categorical columns, row-group pruned shard reads, the categorical-aware writer, the I/O pipeline."""

import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.formats import stream
from stages.formats.columns import codes, concat, stable_argsort_int
from stages.formats.io import write_table
from stages.formats.stream import TableWriter, image_shards, pipeline, read_shard
from stages.ops.nms import segment_order, suppress


@pytest.mark.parametrize("hi", [10, 70_000, 5_000_000_000])
def test_stable_argsort_int_equals_numpy_stable(hi):
    keys = np.random.default_rng(hi).integers(0, hi, 20_000)
    keys[::7] = keys[0]                                         # many ties: stability matters
    assert np.array_equal(stable_argsort_int(keys), np.argsort(keys, kind="stable"))


def test_segment_order_is_key_then_score_desc_then_index():
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, 5000)
    scores = rng.integers(0, 20, 5000) / 20.0                   # ties inside a key
    want = np.lexsort((np.arange(5000), -scores, keys))
    assert np.array_equal(segment_order(keys, scores), want)


def test_codes_of_categorical_follow_sorted_values():
    s = pd.Series(pd.Categorical(["b", "c", "a", "b"], categories=["c", "b", "a"]))
    c, n = codes(s, sort=True)
    assert n == 3 and c.tolist() == [1, 2, 0, 1]
    c2, _ = codes(s.astype(object), sort=True)
    assert c.tolist() == c2.tolist()


def _dets(n=3000, images=300, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.random((n, 2)) * 0.6
    b = np.concatenate([c, c + rng.random((n, 2)) * 0.4], 1)
    return pd.DataFrame({"image_id": rng.choice([f"img{k:04d}" for k in range(images)], n),
                         "label": rng.choice(["/m/a", "/m/b", "/m/c"], n), "score": rng.random(n),
                         "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]})


def test_shard_reads_prune_row_groups_and_match_a_filter(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "ROW_GROUP", 256)                   # many row groups, shards cut through them
    path = tmp_path / "d.parquet"
    with TableWriter(path, "detections") as w:
        w.write(_dets())
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    whole = pd.read_parquet(path)
    shards = image_shards([path], rows_per_shard=700)
    assert len(shards) > 3
    parts = []
    for first, last in shards:
        plain = read_shard(path, "detections", first, last)
        cat = read_shard(path, "detections", first, last, categorical=True)
        assert isinstance(cat["image_id"].dtype, pd.CategoricalDtype) and plain["image_id"].dtype == object
        pd.testing.assert_frame_equal(cat.astype({"image_id": object, "label": object}), plain)
        want = whole[(whole.image_id >= first) & (whole.image_id <= last)].reset_index(drop=True)
        pd.testing.assert_frame_equal(plain, want)
        parts.append(plain)
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_writer_sorts_categoricals_by_id_and_stores_plain_strings(tmp_path):
    d = _dets(500, 40)
    cat = d.assign(image_id=pd.Categorical(d["image_id"], categories=sorted(set(d["image_id"]), reverse=True)),
                   label=d["label"].astype("category"))
    path = tmp_path / "c.parquet"
    with TableWriter(path, "detections", provenance={"stage": "test"}) as w:
        w.write(cat)
    schema = pq.read_schema(path)
    assert str(schema.field("image_id").type) == "string" and set(schema.metadata) == {b"orchard"}
    back = pd.read_parquet(path)
    assert back["image_id"].dtype == object and back["image_id"].is_monotonic_increasing
    want = d.iloc[np.argsort(d["image_id"].to_numpy(), kind="stable")].reset_index(drop=True)
    pd.testing.assert_frame_equal(back, want)


@pytest.mark.parametrize("method", ["adj_nms", "soft_nms", "nms"])
def test_suppress_same_on_categorical_and_object_columns(method):
    d = _dets(2000, 30, seed=3)
    cat = d.assign(image_id=pd.Categorical(d["image_id"], categories=sorted(set(d["image_id"]), reverse=True)),
                   label=d["label"].astype("category"))
    a = suppress(d, method=method)
    b = suppress(cat, method=method)
    pd.testing.assert_frame_equal(b.astype({"image_id": object, "label": object}), a)


def test_concat_keeps_categoricals_with_different_categories():
    a = pd.DataFrame({"x": pd.Categorical(["p", "q"]), "y": [1, 2]})
    b = pd.DataFrame({"x": pd.Categorical(["r"]), "y": [3]})
    out = concat([a, b])
    assert isinstance(out["x"].dtype, pd.CategoricalDtype)
    assert out["x"].tolist() == ["p", "q", "r"] and out["y"].tolist() == [1, 2, 3]


def test_pipeline_keeps_order_overlaps_and_raises():
    seen, threads = [], set()

    def load(i):
        threads.add(threading.get_ident())
        return i * 10

    pipeline(range(6), load, lambda x: x + 1, seen.append)
    assert seen == [1, 11, 21, 31, 41, 51]
    assert threading.get_ident() not in threads               # loading ran beside the work
    pipeline([], load, lambda x: x, seen.append)
    assert len(seen) == 6

    def boom(x):
        if x == 20:
            raise ValueError("bad shard")
        return x

    out = []
    with pytest.raises(ValueError, match="bad shard"):
        pipeline(range(5), load, boom, out.append)
    assert out == [0, 10]


def test_postprocess_on_cpu_never_imports_torch(tmp_path):
    """The CPU path is numpy only: the stage starts without torch's ~1.5 s import."""
    write_table(tmp_path / "in.parquet", _dets(400, 20), "detections")
    code = ("import sys; from stages.postprocess import main; "
            f"main(['--detections', {str(tmp_path / 'in.parquet')!r}, '--out', {str(tmp_path / 'o.parquet')!r}, "
            "'--device', 'cpu']); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
    assert len(pd.read_parquet(tmp_path / "o.parquet")) > 0


def test_shards_from_row_group_statistics_and_the_fallback(tmp_path, monkeypatch):
    d = _dets(3000, 300)
    sorted_path = tmp_path / "sorted.parquet"
    monkeypatch.setattr(stream, "ROW_GROUP", 500)
    with TableWriter(sorted_path, "detections") as w:
        w.write(d)
    groups = pq.ParquetFile(sorted_path).metadata.num_row_groups
    # an image spanning two row groups forbids cutting there: the writer's groups split images, so the
    # statistics path must refuse them (ranges overlap) and the count path must still keep images whole
    lo_hi = [pq.ParquetFile(sorted_path).metadata.row_group(i).column(0).statistics for i in range(groups)]
    spans = any(a.max >= b.min for a, b in zip(lo_hi, lo_hi[1:]))
    assert (stream._shards_from_statistics(pq.ParquetFile(sorted_path), 1000) is None) == spans
    # a file whose row groups hold whole images, in order: cut from the statistics alone, at group boundaries
    whole = pd.read_parquet(sorted_path)
    ids = sorted(set(whole["image_id"]))
    clean = tmp_path / "clean.parquet"
    writer = pq.ParquetWriter(clean, pq.read_schema(sorted_path))
    for chunk in np.array_split(np.array(ids, dtype=object), 6):
        part = whole[whole["image_id"].isin(set(chunk))]
        writer.write_table(pa.Table.from_pandas(part, preserve_index=False, schema=writer.schema))
    writer.close()
    sizes = [pq.ParquetFile(clean).metadata.row_group(i).num_rows for i in range(6)]
    cut = image_shards([clean], rows_per_shard=max(sizes) * 2)
    assert cut == stream._shards_from_statistics(pq.ParquetFile(clean), max(sizes) * 2)
    assert 2 <= len(cut) <= 4
    got = pd.concat([read_shard(clean, "detections", a, b) for a, b in cut], ignore_index=True)
    pd.testing.assert_frame_equal(got, pd.read_parquet(clean))
    for path in (sorted_path, clean):                       # the count path agrees on what is covered
        two = image_shards([path, path], rows_per_shard=700)
        assert sum(len(read_shard(path, "detections", a, b)) for a, b in two) == len(whole)
