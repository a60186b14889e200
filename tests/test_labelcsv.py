"""The label.csv (CMU-MOSI transcripts) reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msakit.data import load_dataset, load_label_csv, make_batch
from msakit.errors import MsakitError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_LABELS = SHARED_DATA / "mosi-text" / "label.csv"

ROWS = [
    ("aaa_1", "it was really good", "2.4", "train"),
    ("aaa_2", "the plot, honestly, was boring", "-1.2", "train"),
    ("bbb_1", "", "0.0", "train"),
    ("ccc_1", "i loved it", "3.0", "dev"),
    ("ddd_1", "meh", "-0.4", "test"),
    ("ddd_2", "terrible ending", "-3", "test"),
]


def write_csv(path: Path, rows=ROWS, header="id,text,label,mode") -> Path:
    lines = [header]
    for row in rows:
        lines.append(",".join(f'"{v}"' if "," in v else v for v in row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parses_splits_labels_and_tokens(tmp_path):
    ds = load_label_csv(write_csv(tmp_path / "label.csv"), max_len=10)
    assert (ds.family, ds.name) == ("mosi", tmp_path.name)
    assert [len(ds.train), len(ds.valid), len(ds.test)] == [3, 1, 2]
    assert list(ds.train.ids) == ["aaa_1", "aaa_2", "bbb_1"]
    assert ds.train.raw_text[1] == "the plot, honestly, was boring"
    np.testing.assert_allclose(ds.train.labels, [2.4, -1.2, 0.0], rtol=1e-6)
    assert ds.test.labels.dtype == np.float32
    assert ds.train.text_bert.shape == (3, 3, 10) and ds.train.text_bert.dtype == np.int64
    first = ds.train.text_bert[0]
    assert first[0, 0] == 101 and first[0, first[1].sum() - 1] == 102  # [CLS] ... [SEP]
    assert ds.train.text_bert[2, 1].sum() == 2  # empty text: [CLS] [SEP]
    for split in (ds.train, ds.valid, ds.test):
        assert split.audio is None and split.vision is None and split.text is None
    assert ds.dims.has_text_ids and ds.dims.text_len == 10 and ds.dims.audio is None
    batch = make_batch(ds.test, np.array([1]))
    assert batch.ids == ["ddd_2"] and batch.presence.tolist() == [[True, False, False]]


def test_long_text_is_truncated_to_max_len(tmp_path):
    rows = [(*ROWS[0][:1], " ".join(["good"] * 40), *ROWS[0][2:]), *ROWS[1:]]
    ds = load_label_csv(write_csv(tmp_path / "l.csv", rows), max_len=8)
    assert ds.train.text_bert[0, 1].tolist() == [1] * 8
    assert ds.train.text_bert[0, 0, -1] == 102


def test_reads_mmsa_style_columns(tmp_path):
    rows = [(r[0].split("_")[0], r[0].split("_")[1], r[1], r[2], "valid" if r[3] == "dev" else r[3])
            for r in ROWS]
    lines = ["video_id,clip_id,text,label,mode"] + [",".join(
        f'"{v}"' if "," in v else v for v in r) for r in rows]
    path = tmp_path / "label.csv"
    path.write_text("\n".join(lines) + "\n")
    ds = load_label_csv(path)
    assert list(ds.valid.ids) == ["ccc$_$1"]


def test_error_missing_file(tmp_path):
    with pytest.raises(MsakitError, match="not found.*absent.csv"):
        load_label_csv(tmp_path / "absent.csv")


@pytest.mark.parametrize("column", ["id", "text", "label", "mode"])
def test_error_missing_column(tmp_path, column):
    header = ",".join(c if c != column else "other" for c in ("id", "text", "label", "mode"))
    path = write_csv(tmp_path / "x.csv", header=header)
    with pytest.raises(MsakitError, match=f"x.csv: no column '{column}'"):
        load_label_csv(path)


@pytest.mark.parametrize("value", ["positive", "nan", ""])
def test_error_bad_label_names_the_line(tmp_path, value):
    rows = [*ROWS[:3], ("eee_1", "fine", value, "train"), *ROWS[3:]]
    with pytest.raises(MsakitError, match="x.csv line 5: label"):
        load_label_csv(write_csv(tmp_path / "x.csv", rows))


def test_error_unknown_mode(tmp_path):
    rows = [*ROWS, ("eee_1", "fine", "1.0", "holdout")]
    with pytest.raises(MsakitError, match="line 8: unknown mode 'holdout'"):
        load_label_csv(write_csv(tmp_path / "x.csv", rows))


def test_error_empty_split(tmp_path):
    rows = [r for r in ROWS if r[3] != "test"]
    with pytest.raises(MsakitError, match="no rows with mode test"):
        load_label_csv(write_csv(tmp_path / "x.csv", rows))


def test_catalog_finds_label_csv(tmp_path):
    write_csv(tmp_path / "label.csv")
    assert len(load_dataset("mosi-text", data_dir=str(tmp_path)).train) == 3
    assert len(load_dataset("mosi-text", data_dir=str(tmp_path / "label.csv")).test) == 2
    assert load_dataset(str(tmp_path / "label.csv")).family == "mosi"
    with pytest.raises(MsakitError, match="tried:.*label.csv"):
        load_dataset("mosi-text", data_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(MsakitError, match="needs data_dir"):
        load_dataset("mosi-text")


@pytest.mark.skipif(not REAL_LABELS.is_file(), reason="real MOSI transcripts not available")
def test_real_mosi_transcripts():
    ds = load_label_csv(REAL_LABELS)
    sizes = [len(ds.train), len(ds.valid), len(ds.test)]
    assert sum(sizes) == 2195 and sizes == [1281, 229, 685]
    for split in (ds.train, ds.valid, ds.test):
        assert split.labels.min() >= -3 and split.labels.max() <= 3
        assert split.text_bert.shape[1:] == (3, 50)
    every = np.concatenate([ds.train.ids, ds.valid.ids, ds.test.ids])
    assert len(set(every)) == 2195
    # the clip whose video is in shared/data/media
    index = list(ds.train.ids).index("Oz06ZWiO20M_6")
    assert ds.train.labels[index] == pytest.approx(-0.8)
    assert ds.train.raw_text[index].startswith("and sucker punch is a failer")
    assert load_dataset("mosi-text", data_dir=str(SHARED_DATA)).name == "mosi-text"
