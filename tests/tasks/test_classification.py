"""The classification task: label names, one definition each (file name, config maps)."""

from types import SimpleNamespace

from lorafit.tasks.classification import LABELS_FILE, set_label_names


def test_set_label_names_fills_both_maps_in_head_order():
    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0"}, label2id={}))
    set_label_names(model, ["neg", "pos", "10"])
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "10"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "10": 2}
    assert LABELS_FILE == "labels.json"  # what adapters already on disk hold
