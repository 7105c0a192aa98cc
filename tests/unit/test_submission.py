"""The Kaggle detection submission: written by image shards without a Python loop per row, byte for byte what the
obvious per-row formatting writes; read back block by block with errors naming line and prediction."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import submit
from stages.core.errors import InputError
from stages.formats import openimages as oi
from stages.formats.io import write_table
from stages.formats.stream import TableWriter


def per_row_reference(dets: pd.DataFrame, image_ids: list[str]) -> bytes:
    """The submission formatted the obvious way: one Python string per prediction, csv.writer per image."""
    preds: dict[str, list[str]] = {i: [] for i in image_ids}
    for r in dets.itertuples():
        numbers = " ".join(f"{v:.6f}" for v in (r.score, r.x_min, r.y_min, r.x_max, r.y_max))
        preds[r.image_id].append(f"{r.label} {numbers}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(oi.SUBMISSION_COLUMNS)
    for i in sorted(image_ids):
        w.writerow([i, " ".join(preds[i])])
    return buf.getvalue().encode()


def detections(n: int, image_ids: list[str], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lo, hi = np.sort(rng.random((2, n, 2)), axis=0)
    d = pd.DataFrame({"image_id": rng.choice(image_ids, n), "label": rng.choice(["/m/a", "/m/b,c", "/m/0x"], n),
                      "score": rng.random(n), "x_min": lo[:, 0], "y_min": lo[:, 1], "x_max": hi[:, 0],
                      "y_max": hi[:, 1]})
    if n < 6:
        return d
    # printf's edge cases: exact ties (half to even), a value just under a tie, -0, huge and negative scores
    d.loc[:5, "score"] = [0.0078125, 0.0000005, 0.1234565, -0.0, 1e20, -2.5e-7]
    d.loc[:2, "x_min"] = [0.0, np.nextafter(0.0000125, 0), 0.5]
    return d


def write_sorted(path: Path, dets: pd.DataFrame, rows: int) -> None:
    with TableWriter(path, "detections") as w:
        for k in range(0, len(dets), rows):
            w.write(dets.iloc[k:k + rows])


def test_fixed_decimals_equal_printf():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.random(5000), rng.normal(0, 1e3, 500), (np.arange(2000) + 0.5) / 1e6,
                        [0.0, -0.0, 1e-9, -1e-9, 2.0 ** 53, 1e300, np.inf, -np.inf, np.nan]])
    assert oi.fixed_decimals(v).to_pylist() == [f"{x:.6f}" for x in v]
    assert oi.fixed_decimals(v[:20], 3).to_pylist() == [f"{x:.3f}" for x in v[:20]]


@pytest.mark.parametrize("rows_per_shard", [1, 7, 10_000])
def test_sharded_submission_equals_the_per_row_output(tmp_path, rows_per_shard):
    ids = [f"im{i:03d}" for i in range(60)] + ["odd,id"]        # an id CSV must quote
    dets = detections(400, ids[:50] + ["odd,id"])               # ten images without a detection
    write_sorted(tmp_path / "d.parquet", dets, rows=37)
    n = submit.write_submission(tmp_path / "s.csv", detections=tmp_path / "d.parquet", image_ids=ids[::-1],
                                rows_per_shard=rows_per_shard)
    assert n == len(dets)
    # within an image, predictions keep the detections' order (the stable sort by image of the writer)
    expected = per_row_reference(dets.sort_values("image_id", kind="stable"), ids)
    assert (tmp_path / "s.csv").read_bytes() == expected


def test_submission_without_detections_and_with_a_stranger(tmp_path):
    write_table(tmp_path / "none.parquet", detections(0, ["a"]), "detections")
    submit.write_submission(tmp_path / "s.csv", detections=tmp_path / "none.parquet", image_ids=["b", "a"])
    assert (tmp_path / "s.csv").read_text() == "ImageId,PredictionString\na,\nb,\n"
    write_sorted(tmp_path / "d.parquet", detections(20, ["a"]).assign(image_id=["a"] * 19 + ["z"]), rows=20)
    with pytest.raises(InputError, match="'z', which is not in the test set"):
        submit.write_submission(tmp_path / "bad.csv", detections=tmp_path / "d.parquet", image_ids=["a"])
    assert not (tmp_path / "bad.csv").exists()


def test_submit_cli_round_trip(tmp_path, capsys):
    ids = [f"t{i}" for i in range(30)]
    dets = detections(300, ids[:25])
    write_sorted(tmp_path / "d.parquet", dets, rows=50)
    write_table(tmp_path / "test.parquet", pd.DataFrame({"image_id": ids, "path": ids, "width": 1, "height": 1}),
                "images")
    assert submit.main(["--detections", str(tmp_path / "d.parquet"), "--images", str(tmp_path / "test.parquet"),
                        "--out", str(tmp_path / "s.csv"), "--rows-per-shard", "40"]) == 0
    assert "30 images, 300 predictions" in capsys.readouterr().out
    back = oi.read_detection_submission(tmp_path / "s.csv")
    ref = dets.sort_values("image_id", kind="stable").reset_index(drop=True)
    assert list(back["image_id"]) == list(ref["image_id"]) and list(back["label"]) == list(ref["label"])
    np.testing.assert_allclose(back[["score", "x_min", "y_min", "x_max", "y_max"]],
                               ref[["score", "x_min", "y_min", "x_max", "y_max"]], atol=5e-7)


@pytest.mark.parametrize("line,needle", [
    ("b,/m/a 0.5 0.1 0.1 0.2", "PredictionString has 5 fields, not a multiple of 6"),
    ("b,/m/a 0.5 0.1 0.1 0.2 zero", "prediction 1: y_max is not a number: 'zero'"),
    ("b,/m/a 0.5 0.1 0.1 0.2 1.2", "outside [0, 1]"),
])
def test_submission_reader_names_line_and_prediction(tmp_path, line, needle):
    p = tmp_path / "s.csv"
    p.write_text(f"ImageId,PredictionString\na,/m/a 0.9 0 0 1 1\n,\n{line}\n")
    with pytest.raises(InputError) as e:
        oi.read_detection_submission(p, known_labels={"/m/a"})
    assert "line 4" in str(e.value) and needle in str(e.value)


def test_submission_reader_blocks_agree(tmp_path):
    ids = [f"im{i:03d}" for i in range(40)]
    dets = detections(500, ids)
    (tmp_path / "s.csv").write_bytes(per_row_reference(dets, ids))
    whole = oi.read_detection_submission(tmp_path / "s.csv")
    blocks = list(oi.iter_detection_submission(tmp_path / "s.csv", block_size=2048))
    assert len(blocks) > 3 and sum(r for r, _ in blocks) == 40
    parts = pd.concat([d.astype({"image_id": object, "label": object}) for _, d in blocks], ignore_index=True)
    pd.testing.assert_frame_equal(parts, whole)
