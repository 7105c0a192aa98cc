"""OpenImages Challenge files <-> canonical tables. The only module that knows the CSV column names and order.

Every reader validates and raises :class:`~stages.core.errors.InputError` naming the file, the line (header = line 1)
and the column as the user sees it in the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from stages.core.errors import InputError
from stages.formats.columns import concat, positions
from stages.formats.tables import BOX_COLUMNS, check_boxes, check_labels, conform, empty

BBOX_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
BBOX_REQUIRED = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf"]
LABEL_COLUMNS = ["ImageID", "Source", "LabelName", "Confidence"]
MASK_COLUMNS = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
                "PredictedIoU", "Clicks"]
SUBMISSION_COLUMNS = ["ImageId", "PredictionString"]
SEG_SUBMISSION_COLUMNS = ["ImageID", "ImageWidth", "ImageHeight", "PredictionString"]

#: canonical box column -> OpenImages CSV column
BOX_NAMES = {"x_min": "XMin", "x_max": "XMax", "y_min": "YMin", "y_max": "YMax"}
_FLAGS = {"IsOccluded": "is_occluded", "IsTruncated": "is_truncated", "IsDepiction": "is_depiction",
          "IsInside": "is_inside"}


def _read_csv(path: str | os.PathLike, required: Iterable[str], *, header: bool = True,
              names: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV as strings; check the header and that every row has the header's field count."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, header=0 if header else None, names=names,
                         engine="c", on_bad_lines="error")
    except pd.errors.ParserError as exc:
        msg = str(exc)
        line = None
        if " line " in msg:
            try:
                line = int(msg.split(" line ")[1].split(",")[0])
            except ValueError:
                line = None
        raise InputError(f"malformed CSV: {msg}", file=path, row=line) from exc
    except pd.errors.EmptyDataError as exc:
        raise InputError("empty file (no header)", file=path, row=1) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}", file=path) from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; header has {list(df.columns)}", file=path, row=1,
                         field=missing[0])
    return df


class _Lines:
    """Data row position -> its line in the file (the header is line 1), without an array per row."""

    def __getitem__(self, i: int) -> int:
        return int(i) + 2


def _lines(n: int, header: bool = True) -> np.ndarray:
    return np.arange(n) + (2 if header else 1)


# ----- typed, columnar reading (pyarrow) --------------------------------------------------------------------
_DICT = pa.dictionary(pa.int32(), pa.string())
_BLOCK = 1 << 24


def _header(path: Path) -> list[str]:
    if not path.exists():
        raise InputError("file not found", file=path)
    with open(path, "rb") as f:
        first = f.readline()
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc}", file=path, row=1) from exc
    if not text.strip():
        raise InputError("empty file (no header)", file=path, row=1)
    return next(csv.reader([text]))


def _arrow_csv(path: Path, types: Mapping[str, pa.DataType], *, use_threads: bool = True) -> pa.Table:
    """The columns ``types`` of a CSV with a header, typed; a row with the wrong field count is an error naming
    its line (found again single-threaded: the threaded reader does not know line numbers). A value that does
    not convert to its type raises ``pa.ArrowInvalid`` (the caller finds it); anything else unreadable is an
    :class:`InputError`."""
    bad: list[pacsv.InvalidRow] = []

    def invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    try:
        return pacsv.read_csv(
            path, read_options=pacsv.ReadOptions(use_threads=use_threads, block_size=_BLOCK),
            parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(column_types=dict(types), include_columns=list(types),
                                                 null_values=[""], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            if row.number is None and use_threads:
                return _arrow_csv(path, types, use_threads=False)
            raise InputError(f"malformed CSV: expected {row.expected_columns} fields, saw {row.actual_columns}",
                             file=path, row=row.number) from exc
        if "UTF8" in str(exc):
            raise InputError(f"not UTF-8 text: {exc}", file=path) from exc
        if "conversion error" in str(exc):
            raise
        raise InputError(f"malformed CSV: {exc}", file=path) from exc


def _raw(path: Path, col: str, i: int) -> str:
    """The text of field ``col`` on data row ``i`` (for error messages)."""
    return _arrow_csv(path, {col: pa.string()}).column(0)[i].as_py()


def _typed_columns(path: Path, required: Sequence[str], *, strings: Sequence[str] = (),
                   numbers: Sequence[str] = ()) -> pa.Table:
    """Read ``strings`` (dictionary-encoded: one Python object per distinct value) and the ``numbers`` present
    (float64, null where blank) of an OpenImages CSV; check the header has ``required``. Values that do not
    parse as numbers come back as NaN (not null), for :func:`_number_column` to report."""
    header = _header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(f"missing column(s) {missing}; header has {header}", file=path, row=1, field=missing[0])
    numbers = [c for c in numbers if c in header]
    types = {c: _DICT for c in strings} | {c: pa.float64() for c in numbers}
    try:
        return _arrow_csv(path, types)
    except pa.ArrowInvalid:   # a number arrow does not parse (e.g. padded with spaces, or not a number)
        pass
    table = _arrow_csv(path, {c: _DICT for c in strings} | {c: pa.string() for c in numbers})
    for c in numbers:
        text = pd.Series(table.column(c).to_numpy(zero_copy_only=False), dtype=object).str.strip()
        v = pd.to_numeric(text, errors="coerce").to_numpy(np.float64)
        table = table.set_column(table.schema.get_field_index(c), c,
                                 pa.array(v, mask=(text == "").to_numpy(), type=pa.float64()))
    return table


def _number_column(table: pa.Table, col: str, path: Path, *, integer: bool = False,
                   blank: float | None = None) -> np.ndarray:
    """``col`` as float64; a blank (``blank`` given: that value) or NaN field, or a fraction where ``integer``,
    is an error naming the line and the text."""
    arr = table.column(col)
    v = arr.to_numpy()
    bad = np.isnan(v)
    if blank is not None and bad.any():
        v = np.where(arr.is_null().to_numpy(zero_copy_only=False), blank, v)
        bad = np.isnan(v)
    if integer:
        bad |= ~bad & (v % 1 != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"not a{'n integer' if integer else ' number'}: {_raw(path, col, i)!r}", file=path,
                         row=i + 2, field=col)
    return v


def _string_column(table: pa.Table, col: str, path: Path) -> pd.Categorical:
    """``col`` as a pandas Categorical; an empty (or blank) value is an error naming its line."""
    cat = pd.Categorical(table.column(col).to_pandas())
    empty = pd.Index(cat.categories, dtype=object).str.strip().str.len() == 0
    bad = np.append(empty, False)[cat.codes]
    if bad.any():
        raise InputError(f"empty {'image id' if col == 'ImageID' else 'value'}", file=path,
                         row=int(np.flatnonzero(bad)[0]) + 2, field=col)
    return cat


def _ids_and_labels(table: pa.Table, path: Path, known_labels: set[str] | None) -> pd.DataFrame:
    """``image_id`` and ``label`` (Categoricals) of a typed OpenImages table, checked (empty ids, unknown MIDs)."""
    out = pd.DataFrame({"image_id": _string_column(table, "ImageID", path),
                        "label": table.column("LabelName").to_pandas()})
    check_labels(out["label"], known_labels, source=path, rows=_Lines(), field="LabelName")
    return out


def _check_binary(col: str, v: np.ndarray, path: Path) -> None:
    bad = (v != 0) & (v != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"must be 0 or 1, got {_raw(path, col, i)!r}", file=path, row=i + 2, field=col)


# ----- readers ----------------------------------------------------------------------------------------------
def read_classes(path: str | os.PathLike) -> pd.DataFrame:
    """``MID,name`` with no header -> ``classes`` table. Duplicate MIDs are an error (names may repeat)."""
    df = _read_csv(path, [], header=False, names=["label", "name"])
    df.index = pd.RangeIndex(len(df))
    lines = _lines(len(df), header=False)
    empty = (df["label"].str.len() == 0).to_numpy()
    if empty.any():
        raise InputError("empty MID", file=path, row=int(lines[np.flatnonzero(empty)[0]]), field="MID")
    dup = df["label"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"duplicate MID {df['label'].iloc[i]!r}", file=path, row=int(lines[i]), field="MID")
    return conform(df, "classes", source=path)


def read_boxes(path: str | os.PathLike, *, known_labels: set[str] | None = None,
               categorical: bool = False) -> pd.DataFrame:
    """``…-detection-bbox.csv`` -> ``boxes`` table (xyxy_norm). With ``categorical`` the ids and labels stay
    pandas Categoricals (no Python string per row: what millions of boxes need)."""
    path = Path(path)
    t = _typed_columns(path, BBOX_REQUIRED, strings=["ImageID", "LabelName"],
                       numbers=[*BOX_NAMES.values(), "IsGroupOf", *_FLAGS])
    out = _ids_and_labels(t, path, known_labels)
    for ours, theirs in BOX_NAMES.items():
        out[ours] = _number_column(t, theirs, path)
    check_boxes(out, source=path, rows=_Lines(), names=BOX_NAMES)
    g = _number_column(t, "IsGroupOf", path, integer=True)
    _check_binary("IsGroupOf", g, path)
    out["is_group_of"] = g.astype(bool)
    for theirs, ours in _FLAGS.items():
        if theirs in t.column_names:   # OpenImages uses -1 for "unknown" in these flags (blank: unknown too)
            out[ours] = _number_column(t, theirs, path, integer=True, blank=-1).astype(np.int8)
    return conform(out, "boxes", source=path, keep_categorical=categorical)


def read_image_labels(path: str | os.PathLike, *, known_labels: set[str] | None = None,
                      categorical: bool = False) -> pd.DataFrame:
    """``…-human-imagelabels.csv`` -> ``image_labels`` (confidence 1 verified present, 0 verified absent)."""
    path = Path(path)
    t = _typed_columns(path, ["ImageID", "LabelName", "Confidence"], strings=["ImageID", "LabelName"],
                       numbers=["Confidence"])
    out = _ids_and_labels(t, path, known_labels)
    conf = _number_column(t, "Confidence", path)
    bad = (conf != 0) & (conf != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"verified labels have Confidence 0 or 1, got {_raw(path, 'Confidence', i)!r}",
                         file=path, row=i + 2, field="Confidence")
    out["confidence"] = conf.astype(np.int8)
    return conform(out, "image_labels", source=path, keep_categorical=categorical)


def read_masks_csv(path: str | os.PathLike, *, known_labels: set[str] | None = None) -> pd.DataFrame:
    """``…-segmentation.csv`` -> boxes of the mask instances with ``mask_path`` (relative to the mask dir)."""
    path = Path(path)
    names = {"x_min": "BoxXMin", "x_max": "BoxXMax", "y_min": "BoxYMin", "y_max": "BoxYMax"}
    t = _typed_columns(path, ["MaskPath", "ImageID", "LabelName", *names.values()],
                       strings=["MaskPath", "ImageID", "LabelName"], numbers=list(names.values()))
    out = _ids_and_labels(t, path, known_labels)
    for ours, theirs in names.items():
        out[ours] = _number_column(t, theirs, path)
    check_boxes(out, source=path, rows=_Lines(), names=names)
    out["is_group_of"] = False
    out["mask_path"] = t.column("MaskPath").to_pandas()
    return conform(out, "boxes", source=path)


def read_image_ids(path: str | os.PathLike, column: str) -> pd.Series:
    """The image ids of a list (``test-images.csv``: ImageID) or a Kaggle sample submission (ImageId), in file
    order; an empty or repeated id is an error naming its line."""
    path = Path(path)
    ids = pd.Series(_string_column(_typed_columns(path, [column], strings=[column]), column, path))
    dup = ids.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"duplicate image id {ids.iloc[i]!r}", file=path, row=i + 2, field=column)
    return ids.astype(object)


# ----- writers ----------------------------------------------------------------------------------------------
def fixed_decimals(values: np.ndarray, decimals: int = 6) -> pa.Array:
    """``"%.{decimals}f" % v`` of every value as an arrow string array, built by arrow from the integer
    ``round(v * 10**decimals)`` (no Python object per value): its digits, zero-padded, with the point put in.
    Values within float error of a rounding tie, negative (printf's "-0.000000"), non-finite or huge ones are
    formatted by printf itself, so the text always equals printf's."""
    if decimals < 1:
        raise ValueError(f"decimals must be >= 1, got {decimals}")
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        a = v * 10 ** decimals
        exact = ~(a < 2.0 ** 52) | np.signbit(v) | (np.abs(a - np.floor(a) - 0.5) <= a * 2.0 ** -50)
    k = np.rint(np.where(exact, 0.0, a)).astype(np.int64)
    digits = pc.utf8_lpad(pc.cast(pa.array(k), pa.string()), width=decimals + 1, padding="0")
    out = pc.binary_replace_slice(digits, -decimals, -decimals, ".")
    if exact.any():
        out = pc.replace_with_mask(out, pa.array(exact), pa.array(np.char.mod(f"%.{decimals}f", v[exact])))
    return out


def _csv_field(s: pa.Array) -> pa.Array:
    """Quote a text field where CSV needs it (a comma, quote or line break; csv.QUOTE_MINIMAL)."""
    needs = pc.match_substring_regex(s, '[,"\r\n]')
    if not pc.any(needs).as_py():
        return s
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(s, '"', '""'), '"', "")
    return pc.if_else(needs, quoted, s)


def submission_rows(dets: pd.DataFrame, image_ids: np.ndarray, *, decimals: int = 6) -> bytes:
    """Lines of the Kaggle detection submission for ``image_ids`` (sorted, distinct; every detection's image
    among them): ``ImageId,PredictionString`` with ``LabelName Confidence XMin YMin XMax YMax`` per detection,
    in ``dets`` order within an image; an image without a detection gets an empty string. Vectorised: arrow
    joins the fields, then each image's predictions (a list array cut at image boundaries)."""
    ids = pd.Index(image_ids, dtype=object)
    pos = positions(dets["image_id"], ids)
    if (pos < 0).any():
        raise ValueError(f"detection of image {dets['image_id'].iloc[int(np.flatnonzero(pos < 0)[0])]!r} "
                         "outside the given image ids")
    order = np.argsort(pos, kind="stable")
    label, labels = pd.factorize(dets["label"])
    names = pa.array(np.asarray(labels, dtype=object), pa.string())
    fields = [pa.DictionaryArray.from_arrays(label[order].astype(np.int32), names).cast(pa.string())]
    fields += [fixed_decimals(dets[c].to_numpy(np.float64)[order], decimals) for c in ["score", *BOX_COLUMNS]]
    one = pc.binary_join_element_wise(*fields, " ")
    offsets = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(np.bincount(pos, minlength=len(ids)), out=offsets[1:])
    ps = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), one), " ")
    lines = pc.binary_join_element_wise(_csv_field(pa.array(ids.to_numpy(), type=pa.string())), ",",
                                        _csv_field(ps), "\n", "")
    off = np.frombuffer(lines.buffers()[1], np.int32)[lines.offset: lines.offset + len(lines) + 1]
    return lines.buffers()[2].slice(int(off[0]), int(off[-1] - off[0])).to_pybytes() if len(lines) else b""


_PREDICTION_NUMBERS = ("score", "x_min", "y_min", "x_max", "y_max")


def iter_detection_submission(path: str | os.PathLike, *, known_labels: set[str] | None = None,
                               block_size: int = 1 << 24) -> Iterator[tuple[int, pd.DataFrame]]:
    """A Kaggle detection submission, block by block: ``(rows, detections)`` per block of the file (memory
    bounded by the block, whatever the file's size). Errors name the line and the prediction."""
    path = Path(path)
    header = _header(path)
    missing = [c for c in SUBMISSION_COLUMNS if c not in header]
    if missing:
        raise InputError(f"missing column(s) {missing}; header has {header}", file=path, row=1, field=missing[0])
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block_size),
                            convert_options=pacsv.ConvertOptions(
                                column_types={c: pa.string() for c in SUBMISSION_COLUMNS},
                                include_columns=SUBMISSION_COLUMNS, strings_can_be_null=False,
                                quoted_strings_can_be_null=False))
    line, first_prediction = 2, 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:
            raise InputError(f"malformed CSV: {exc}", file=path) from exc
        dets = _parse_predictions(batch.column(0), batch.column(1), path=path, first_line=line,
                                  first_prediction=first_prediction, known_labels=known_labels)
        yield batch.num_rows, dets
        line += batch.num_rows
        first_prediction += len(dets)


def _parse_predictions(ids: pa.Array, strings: pa.Array, *, path: Path, first_line: int, first_prediction: int,
                       known_labels: set[str] | None) -> pd.DataFrame:
    tokens = pc.ascii_split_whitespace(strings)          # as str.split(), but blanks at either end give ""
    offsets = tokens.offsets.to_numpy()
    flat = pc.list_flatten(tokens)
    real = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    upto = np.r_[0, np.cumsum(real)]
    n = upto[offsets[1:] - offsets[0]] - upto[offsets[:-1] - offsets[0]]
    bad = n % 6 != 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"PredictionString has {n[i]} fields, not a multiple of 6 "
                         "(LabelName Confidence XMin YMin XMax YMax)", file=path, row=first_line + i,
                         field="PredictionString")
    if not real.all():
        flat = flat.filter(pa.array(real))
    count = n // 6
    line_of = np.repeat(np.arange(len(n)) + first_line, count)
    at = np.arange(0, len(flat), 6)
    image = pd.Categorical(pc.dictionary_encode(ids).to_pandas())
    out = pd.DataFrame({"image_id": pd.Categorical.from_codes(np.repeat(image.codes, count), image.categories),
                        "label": pd.Categorical(pc.dictionary_encode(flat.take(at)).to_pandas())})
    text = flat.take((at[:, None] + np.arange(1, 6)).ravel())
    try:
        v = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        v = pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False)), errors="coerce").to_numpy(np.float64)
    bad = np.isnan(v)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InputError(f"prediction {first_prediction + k // 5}: {_PREDICTION_NUMBERS[k % 5]} is not a number: "
                         f"{text[k].as_py()!r}", file=path, row=int(line_of[k // 5]), field="PredictionString")
    for j, col in enumerate(_PREDICTION_NUMBERS):
        out[col] = v[j::5]
    check_labels(out["label"], known_labels, source=path, rows=line_of, field="PredictionString")
    check_boxes(out, source=path, rows=line_of, names={c: f"PredictionString:{c}" for c in BOX_COLUMNS})
    return out


def read_detection_submission(path: str | os.PathLike, *, known_labels: set[str] | None = None,
                              categorical: bool = False) -> pd.DataFrame:
    """A Kaggle detection submission -> ``detections`` table. Errors name the line and the prediction."""
    parts = [d for _, d in iter_detection_submission(path, known_labels=known_labels)]
    dets = concat(parts) if parts else empty("detections")
    return conform(dets, "detections", source=path, keep_categorical=categorical)
