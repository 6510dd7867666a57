"""Label sets: where a model's class names come from, and how `--categories` is matched against them."""

from __future__ import annotations

import re

import pytest

from disasm.compiler.errors import DisasmError
from disasm.compiler.labels import BUILTIN_LABEL_SETS, LabelSet, match_categories, resolve_labels

NO_METADATA: dict[str, str] = {}


def error_text(spec: str | None, metadata: dict[str, str], num_classes: int) -> str:
    with pytest.raises(DisasmError) as info:
        resolve_labels(spec, metadata, num_classes)
    return str(info.value)


def match_error(requested: str, labels: LabelSet) -> str:
    with pytest.raises(DisasmError) as info:
        match_categories(requested, labels)
    return str(info.value)


# --- built-in label sets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, count, background, spot", [
    ("voc", 21, "background", {0: "background", 1: "aeroplane", 11: "diningtable", 15: "person", 16: "pottedplant",
                               20: "tvmonitor"}),
    ("coco-voc", 21, "__background__", {0: "__background__", 7: "car", 15: "person", 20: "tvmonitor"}),
    ("cityscapes", 19, None, {0: "road", 6: "traffic light", 11: "person", 13: "car", 18: "bicycle"}),
    ("ade20k", 150, None, {0: "wall", 7: "bed", 12: "person", 20: "car", 136: "traffic light", 149: "flag"}),
])
def test_builtin_label_sets(name, count, background, spot):
    labels = resolve_labels(name, NO_METADATA, count)
    assert len(labels.names) == count
    assert labels.background == background
    assert labels.source == f"built-in {name}"
    assert {i: labels.names[i] for i in spot} == spot


def test_coco_voc_is_voc_with_torchvision_background_name():
    voc = resolve_labels("voc", NO_METADATA, 21).names
    coco_voc = resolve_labels("coco-voc", NO_METADATA, 21).names
    assert coco_voc[1:] == voc[1:]
    assert (voc[0], coco_voc[0]) == ("background", "__background__")


@pytest.mark.parametrize("name", list(BUILTIN_LABEL_SETS))
def test_builtin_names_are_clean(name):
    names, _ = BUILTIN_LABEL_SETS[name]
    assert all(n == n.strip() and n and "," not in n for n in names)


def test_builtin_name_is_case_and_separator_insensitive():
    assert resolve_labels("COCO_VOC", NO_METADATA, 21).source == "built-in coco-voc"


def test_existing_file_wins_over_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "voc").write_text("sky\nground\n", encoding="utf-8")
    labels = resolve_labels("voc", NO_METADATA, 2)
    assert labels == LabelSet(names=("sky", "ground"), background=None, source="file voc")


# --- files -----------------------------------------------------------------------------------------------------------

def test_label_file_skips_comments_and_blank_lines_and_reads_utf8(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# my classes\n\n  background  \nperson\n\n# a comment\nvoiture électrique\n街灯\n",
                    encoding="utf-8")
    labels = resolve_labels(str(path), NO_METADATA, 4)
    assert labels == LabelSet(names=("background", "person", "voiture électrique", "街灯"), background="background",
                              source=f"file {path}")


def test_label_file_with_byte_order_mark(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffbg\ncar\n".encode("utf-8"))
    labels = resolve_labels(str(path), NO_METADATA, 2)
    assert labels.names == ("bg", "car") and labels.background == "bg"


def test_label_file_background_only_at_index_0(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("car\nbackground\n", encoding="utf-8")
    assert resolve_labels(str(path), NO_METADATA, 2).background is None


def test_label_file_not_utf8(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"car\nvoiture \xe9lectrique\n")
    message = error_text(str(path), NO_METADATA, 2)
    assert message.startswith(f"labels file {path}: not UTF-8 text")
    assert "save it as UTF-8" in message


def test_label_file_with_only_comments(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    assert error_text(str(path), NO_METADATA, 2) == (
        f"labels file {path}: no class names (only blank lines and '#' comments)")


def test_label_file_name_with_comma(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("road\ncar, truck\n", encoding="utf-8")
    message = error_text(str(path), NO_METADATA, 2)
    assert message.startswith(f"labels file {path}, line 2: 'car, truck' contains a comma")


def test_label_spec_that_is_a_folder(tmp_path):
    assert "is a folder" in error_text(str(tmp_path), NO_METADATA, 2)


# --- comma lists and bad specs ---------------------------------------------------------------------------------------

def test_comma_list():
    labels = resolve_labels(" __background__ , circle,star ", NO_METADATA, 3)
    assert labels == LabelSet(names=("__background__", "circle", "star"), background="__background__",
                              source="command line")


def test_comma_list_without_background():
    assert resolve_labels("circle,star", NO_METADATA, 2).background is None


def test_comma_list_with_empty_name():
    assert error_text("circle,,star", NO_METADATA, 3) == (
        "labels 'circle,,star': name 2 of 3 is empty; remove the extra comma")


@pytest.mark.parametrize("spec", ["vocc", "labels.txt", ""])
def test_spec_that_is_nothing_known(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert error_text(spec, NO_METADATA, 21) == (
        f"labels {spec!r}: not a file, not a built-in label set (voc, coco-voc, cityscapes, ade20k), "
        "and not a comma-separated list")


# --- metadata and the generic fallback -------------------------------------------------------------------------------

def test_metadata_classes_and_background():
    meta = {"disasm.classes": "background, circle,star", "disasm.background": "background"}
    assert resolve_labels(None, meta, 3) == LabelSet(names=("background", "circle", "star"), background="background",
                                                     source="model metadata")


def test_metadata_classes_without_background_entry_have_none():
    assert resolve_labels(None, {"disasm.classes": "background,car"}, 2).background is None


def test_metadata_background_not_among_classes():
    message = error_text(None, {"disasm.classes": "sky,car", "disasm.background": "void"}, 2)
    assert message.startswith("model metadata disasm.background='void' is not one of the classes in disasm.classes")
    assert "sky, car" in message


def test_metadata_background_applies_to_an_explicit_list():
    labels = resolve_labels("sky,void,car", {"disasm.background": "void"}, 3)
    assert labels.background == "void"
    assert resolve_labels("sky,car", {"disasm.background": "void"}, 2).background is None


def test_explicit_spec_wins_over_metadata_classes():
    labels = resolve_labels("cityscapes", {"disasm.classes": ",".join(f"c{i}" for i in range(19))}, 19)
    assert labels.source == "built-in cityscapes" and labels.names[13] == "car"


def test_generic_names_without_spec_or_metadata():
    assert resolve_labels(None, {"disasm.mean": "0,0,0"}, 3) == LabelSet(
        names=("class0", "class1", "class2"), background=None, source="generic")


# --- count mismatches and duplicates ---------------------------------------------------------------------------------

def test_count_mismatch_names_both_counts_and_the_source():
    assert error_text("voc", NO_METADATA, 19) == (
        "21 class names from built-in voc, but the model's output has 19 channels; "
        "give exactly 19 names, in output-channel order")


def test_count_mismatch_from_metadata():
    message = error_text(None, {"disasm.classes": "a,b,c"}, 4)
    assert message.startswith("3 class names from model metadata, but the model's output has 4 channels")


def test_ade20k_off_by_one_hints_at_reduce_zero_label():
    message = error_text("ade20k", NO_METADATA, 151)
    assert message.startswith("150 class names from built-in ade20k, but the model's output has 151 channels")
    assert "reduce_zero_label=False" in message and "extra 'background' at index 0" in message
    assert "pass a file" in message
    assert "reduce_zero_label" not in error_text("voc", NO_METADATA, 22)


def test_duplicate_names():
    message = error_text("car,person,car", NO_METADATA, 3)
    assert message.startswith("labels from command line: duplicate class names 'car' (2x)")


def test_duplicates_after_normalisation(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("traffic light\nTraffic_Light\nroad\n", encoding="utf-8")
    message = error_text(str(path), NO_METADATA, 3)
    assert "duplicate class names 'traffic light' / 'Traffic_Light' (2x)" in message
    assert "ignoring case and ' ', '_', '-'" in message


# --- matching categories ---------------------------------------------------------------------------------------------

@pytest.fixture
def cityscapes() -> LabelSet:
    return resolve_labels("cityscapes", NO_METADATA, 19)


@pytest.fixture
def voc() -> LabelSet:
    return resolve_labels("voc", NO_METADATA, 21)


def test_match_returns_indices_in_output_order(voc):
    assert match_categories("person,car", voc) == [7, 15]


@pytest.mark.parametrize("requested", ["traffic_light", "Traffic-Light", "TRAFFIC LIGHT", " traffic  light "])
def test_match_ignores_case_and_separators(cityscapes, requested):
    assert match_categories(requested, cityscapes) == [6]


def test_match_removes_duplicates(cityscapes):
    assert match_categories("car,person,Car,car", cityscapes) == [11, 13]


@pytest.mark.parametrize("background_name", ["background", "Background", "__background__"])
def test_match_ignores_the_background(voc, background_name):
    assert match_categories(f"{background_name},person", voc) == [15]


def test_match_background_on_torchvision_labels():
    labels = resolve_labels("coco-voc", NO_METADATA, 21)
    assert match_categories("__background__,dog", labels) == [12]


def test_match_only_background_is_an_error(voc):
    assert match_error("background", voc) == (
        "the categories name only the background class 'background', which is always kept; "
        "name at least one object class, e.g. aeroplane")


@pytest.mark.parametrize("requested", ["", " , ,"])
def test_match_nothing_is_an_error(voc, requested):
    assert match_error(requested, voc).startswith(f"no categories given ({requested!r}); name at least one class")


def test_unknown_category_suggests_close_names(cityscapes):
    message = match_error("person,trafic light", cityscapes)
    assert message.startswith("unknown category 'trafic light' (did you mean 'traffic light'")
    assert "labels from built-in cityscapes: road, sidewalk, building" in message
    assert "(19 in all)" in message


def test_unknown_category_suggests_at_most_three():
    labels = resolve_labels("car1,car2,car3,car4,truck", NO_METADATA, 5)
    suggestion = re.search(r"did you mean ([^?]*)\?", match_error("car", labels)).group(1)
    assert len(suggestion.split(", ")) == 3


def test_unknown_categories_all_reported_without_suggestion_when_nothing_is_close(voc):
    message = match_error("persn,zzz,dog", voc)
    assert message.startswith("unknown categories 'persn' (did you mean 'person'?); 'zzz'; labels from built-in voc")


def test_background_word_is_unknown_when_the_labels_have_none(cityscapes):
    assert match_error("background", cityscapes).startswith("unknown category 'background'")


def test_match_on_ade20k_names_with_spaces():
    labels = resolve_labels("ade20k", NO_METADATA, 150)
    assert match_categories("person,chest_of_drawers,car", labels) == [12, 20, 44]
