"""Class tables, label-id look-up tables and evaluation protocols."""

from __future__ import annotations

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cs_labels
from cityscapesscripts.helpers.labels import trainId2label

from dast.config import ClassSpec, DatasetConfig
from dast.data.labels import (
    SYNTHIA_13,
    SYNTHIA_16,
    ClassTable,
    cityscapes_id_to_train_lut,
    cityscapes_table,
    protocols_for,
    synthia_id_to_train_lut,
    table_for,
    train_to_cityscapes_id,
)
from dast.data.synthetic import SYNTHETIC_CLASSES
from dast.errors import ConfigError


def test_cityscapes_table_follows_cityscapesscripts_in_train_id_order():
    table = cityscapes_table()
    assert table.num_classes == 19
    assert table.names[:3] == ("road", "sidewalk", "building")
    assert table.names[-1] == "bicycle"
    for t in range(19):
        assert table.names[t] == trainId2label[t].name
        assert table.colors[t] == tuple(trainId2label[t].color)


def test_cityscapes_id_lut_and_its_inverse():
    lut = cityscapes_id_to_train_lut()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert lut[7] == 0 and lut[8] == 1 and lut[11] == 2 and lut[26] == 13 and lut[33] == 18
    assert lut[0] == 255 and lut[9] == 255 and lut[34] == 255 and lut[255] == 255
    mapped = {lab.id for lab in cs_labels if 0 <= lab.id and 0 <= lab.trainId < 19}
    assert int((lut != 255).sum()) == len(mapped) == 19
    inverse = train_to_cityscapes_id()
    assert np.array_equal(lut[inverse[:19]], np.arange(19))
    assert inverse[255] == 0  # ignore -> 'unlabeled', which the official evaluator ignores


def test_synthia_lut_maps_the_documented_ids():
    lut = synthia_id_to_train_lut()
    assert lut.shape == (65536,) and lut.dtype == np.uint8
    expected = {
        3: 0,
        4: 1,
        2: 2,
        21: 3,
        5: 4,
        7: 5,
        15: 6,
        9: 7,
        6: 8,
        16: 9,
        1: 10,
        10: 11,
        17: 12,
        8: 13,
        18: 14,
        19: 15,
        20: 16,
        12: 17,
        11: 18,
    }
    for sid, tid in expected.items():
        assert lut[sid] == tid
    others = np.setdiff1d(np.arange(65536), list(expected))
    assert np.all(lut[others] == 255)


def test_synthia_protocols():
    assert len(SYNTHIA_16) == 16 and not {9, 14, 16} & set(SYNTHIA_16)
    assert len(SYNTHIA_13) == 13 and not {3, 4, 5, 9, 14, 16} & set(SYNTHIA_13)
    assert protocols_for("synthia") == {"miou_16": SYNTHIA_16, "miou_13": SYNTHIA_13}
    assert protocols_for("gta5") == {} and protocols_for("cityscapes") == {}


def test_class_table_palette_and_validation():
    t = ClassTable(("a", "b"), ((1, 2, 3), (4, 5, 6)))
    pal = t.palette()
    assert len(pal) == 768 and pal[:6] == [1, 2, 3, 4, 5, 6] and pal[6:] == [0] * 762
    assert t.num_classes == 2
    with pytest.raises(ValueError):
        ClassTable(("a",), ((1, 2, 3), (4, 5, 6)))
    with pytest.raises(ValueError):
        ClassTable(("a",), ((1, 2, 300),))


def test_table_for_each_kind(tmp_path):
    assert table_for(DatasetConfig(kind="gta5", root="x"), 19) == cityscapes_table()
    with pytest.raises(ConfigError, match="num_classes' is 16"):
        table_for(DatasetConfig(kind="synthia", root="x"), 16)
    cfg = DatasetConfig(
        kind="folder", root=str(tmp_path), classes=[ClassSpec(name="bg"), ClassSpec(name="fg", color=(9, 8, 7))]
    )
    assert table_for(cfg, 2) == ClassTable(("bg", "fg"), ((0, 0, 0), (9, 8, 7)))
    with pytest.raises(ConfigError, match="no class list"):
        table_for(DatasetConfig(kind="folder", root=str(tmp_path)), 2)
    (tmp_path / "classes.yaml").write_text("- {name: water, color: [0, 0, 255]}\n- {name: land, color: [0, 255, 0]}\n")
    t = table_for(DatasetConfig(kind="folder", root=str(tmp_path)), 2)
    assert t.names == ("water", "land") and t.colors[0] == (0, 0, 255)
    with pytest.raises(ConfigError, match="3 but"):
        table_for(DatasetConfig(kind="folder", root=str(tmp_path)), 3)
    syn = table_for(DatasetConfig(kind="synthetic"), None)

    assert syn.names == tuple(n for n, _ in SYNTHETIC_CLASSES)
