"""LoraConfig validation: every user regex is compiled and every name list is checked when the
config is made (a ValueError naming the field), never later inside inject or load_adapter."""

import ast
import math
import re
from pathlib import Path

import pytest

from helpers import tiny_bert
from lorafit import LoraConfig, inject
from lorafit.tuner.config import PEFT_SEQ_CLS_HEADS, lora_scale

TUNER = Path(__file__).resolve().parents[2] / "src" / "lorafit" / "tuner"


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_modules", "q_proj("),
        ("exclude_modules", "[v_proj"),
        ("layers_pattern", "layers("),
        ("layers_pattern", ["h", "layers("]),
        ("rank_pattern", {"q_proj(": 2}),
        ("alpha_pattern", {"*q": 2.0}),
    ],
)
def test_bad_regexes_are_value_errors_naming_the_field(field, value):
    kw = {"target_modules": ["q_proj"], "layers_to_transform": [0], field: value}
    with pytest.raises(ValueError, match=rf"^{field}.*not a valid regular expression \(") as err:
        LoraConfig(**kw)
    assert not isinstance(err.value, re.error)
    data = {"r": 4, "target_modules": ["q_proj"], field: value}  # an adapter_config.json
    with pytest.raises(ValueError, match=rf"^cfg\.json: {field}.*not a valid regular expression"):
        LoraConfig.from_dict(data, source="cfg.json")


def test_good_regexes_still_work():
    cfg = LoraConfig(
        target_modules=r".*\.(q|v)_proj",
        exclude_modules=r".*layers\.1\..*",
        layers_pattern="layers",
        layers_to_transform=0,
        rank_pattern={r"layers\.0\..*q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    assert cfg.layers_to_transform == [0]
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 3


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_modules", ["q_proj", 1]),
        ("target_modules", ["q_proj", ""]),
        ("target_modules", ""),
        ("target_modules", 3),
        ("exclude_modules", [None]),
        ("modules_to_save", [1]),
        ("modules_to_save", "classifier"),  # a string would be read letter by letter
        ("layers_pattern", [2]),
        ("layers_to_transform", ["0"]),
        ("layers_to_transform", [True]),
        ("rank_pattern", {1: 2}),
        ("rank_pattern", [("q_proj", 2)]),
    ],
)
def test_element_types_are_value_errors_naming_the_field(field, value):
    kw = {"target_modules": ["q_proj"], field: value}
    with pytest.raises(ValueError, match=rf"^{field}"):
        LoraConfig(**kw)


def test_name_lists_are_normalised():
    cfg = LoraConfig(
        target_modules=("v_proj", "q_proj", "q_proj"),
        exclude_modules={"b", "a"},
        modules_to_save=("score",),
    )
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.exclude_modules == ["a", "b"] and cfg.modules_to_save == ["score"]


def test_peft_seq_cls_heads_are_one_named_constant():
    """PEFT adds both head names to modules_to_save for SEQ_CLS, whatever the model has."""
    assert PEFT_SEQ_CLS_HEADS == ("classifier", "score")
    model = tiny_bert()  # its head is "classifier"; "score" matches nothing and is tolerated
    inject(
        model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier", "score"])
    )
    with pytest.raises(ValueError, match="'pooler_x' matches no module"):
        inject(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler_x"]), "b")
    inject_src = (TUNER / "inject.py").read_text()
    assert '"score"' not in inject_src and '"classifier"' not in inject_src


def test_lora_scale_is_written_once():
    assert lora_scale(32, 16) == 2.0
    assert lora_scale(32, 16, rslora=True) == pytest.approx(32 / math.sqrt(16))
    for name in ("layer.py", "peft_format.py"):  # where the formula used to be written out
        calls = [
            ast.unparse(n.func)
            for n in ast.walk(ast.parse((TUNER / name).read_text()))
            if isinstance(n, ast.Call)
        ]
        assert "lora_scale" in calls and not [c for c in calls if "sqrt" in c], name
