import warnings

import pytest
import torch

from helpers import conv_net, model_input, outputs, tiny_bert, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, LoraLayer, TrainedCopy, find_targets, inject, parameter_report


def _wrapped(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize(
    "make,kind",
    [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert, "bert"), (conv_net, "conv")],
)
def test_step0_model_identity(make, kind):
    model = make()
    x = model_input(kind)
    before = outputs(model, x)
    targets = {
        "llama": "all-linear",
        "gpt2": ["c_attn", "c_fc", "wte"],
        "bert": ["query", "value"],
        "conv": ["conv", "conv1d"],
    }[kind]
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert _wrapped(model)
    assert torch.equal(outputs(model, x), before)


def test_all_linear_skips_output_head_and_freezes_rest(llama):
    report = inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = _wrapped(llama)
    assert "lm_head" not in wrapped and len(wrapped) == 2 * 7
    trainable = [n for n, p in llama.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    expected = sum(
        4 * (m.dims()[0] + m.dims()[1]) for m in llama.modules() if isinstance(m, LoraLayer)
    )
    assert report.trainable == expected
    assert report.total == sum(p.numel() for p in llama.parameters())


def test_suffix_regex_exclude_layers(llama):
    cfg = LoraConfig(
        r=2,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["model.layers.1.self_attn.v_proj"],
    )
    inject(llama, cfg)
    assert _wrapped(llama) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    m2 = tiny_llama()
    inject(m2, LoraConfig(r=2, target_modules=r".*\.mlp\.(up|down)_proj", layers_to_transform=[1]))
    assert _wrapped(m2) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_rank_and_alpha_patterns(llama):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"q_proj": 3},
    )
    inject(llama, cfg)
    layers = dict((p, m) for p, m in llama.named_modules() if isinstance(m, LoraLayer))
    assert layers["model.layers.0.self_attn.v_proj"].adapters["default"].r == 2
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].r == 6
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].scale == pytest.approx(
        3 / 4
    )
    assert layers["model.layers.0.self_attn.v_proj"].adapters["default"].scale == pytest.approx(
        8 / 2
    )


def test_modules_to_save_trains_a_copy(bert):
    inject(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(bert.classifier, TrainedCopy)
    assert all(p.requires_grad for p in bert.classifier.copies["default"].parameters())
    assert not any(p.requires_grad for p in bert.classifier.original_module.parameters())


@pytest.mark.parametrize("bias,expect", [("none", 0), ("lora_only", 6), ("all", None)])
def test_bias_modes(gpt2, bias, expect):
    inject(gpt2, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], bias=bias))
    trainable_bias = [
        n for n, p in gpt2.named_parameters() if p.requires_grad and n.endswith("bias")
    ]
    if expect is None:
        assert len(trainable_bias) == sum(
            1 for n, _ in gpt2.named_parameters() if n.endswith("bias")
        )
    else:
        assert len(trainable_bias) == expect


def test_target_typo_names_close_candidates_and_changes_nothing(llama):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="q_proj"):
        inject(llama, LoraConfig(r=4, target_modules=["q_prj"]))
    assert not _wrapped(llama)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_wrong_module_type_is_an_error(llama):
    with pytest.raises(ValueError, match="cannot wrap"):
        inject(llama, LoraConfig(r=4, target_modules=["self_attn"]))


def test_bad_rank_and_config():
    with pytest.raises(ValueError, match="positive integer"):
        LoraConfig(r=0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(r=4)
    with pytest.raises(ValueError, match="did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "target_modules": ["q"], "lora_alhpa": 8})
    with pytest.raises(ValueError, match="does not implement"):
        LoraConfig.from_dict({"r": 4, "target_modules": ["q"], "use_qalora": True})


def test_second_adapter_reuses_wrappers_and_name_clash(llama):
    inject(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    inject(llama, LoraConfig(r=3, target_modules=["q_proj", "k_proj"]), "second")
    q = llama.model.layers[0].self_attn.q_proj
    assert set(q.adapters) == {"default", "second"}
    assert not isinstance(q.base_layer, LoraLayer)
    with pytest.raises(ValueError, match="already has"):
        inject(llama, LoraConfig(r=2, target_modules=["q_proj"]), "second")


def test_find_targets_does_not_modify(llama):
    found = find_targets(llama, LoraConfig(r=2, target_modules=["o_proj"]))
    assert [p for p, _ in found] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert not _wrapped(llama) and not getattr(llama, "lorafit_configs", None)
    assert parameter_report(llama).trainable == sum(p.numel() for p in llama.parameters())


def test_rank_above_module_dims_warns_once_naming_modules(llama):
    # q_proj is 32 -> 32, k_proj 32 -> 16 (2 kv heads of 8): r=20 exceeds only k_proj's min(d_in, d_out)
    with pytest.warns(UserWarning, match=r"cannot have rank above min\(d_in, d_out\)") as caught:
        inject(llama, LoraConfig(r=20, target_modules=["q_proj", "k_proj"]))
    ours = [w for w in caught if "min(d_in, d_out)" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "model.layers.0.self_attn.k_proj (r=20, d_in=32, d_out=16)" in message
    assert "model.layers.1.self_attn.k_proj" in message and "q_proj" not in message
    assert _wrapped(llama)  # a warning, not an error: the adapter is there
    m2 = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # a rank that fits, or a rank_pattern that fixes it: no warning
        inject(
            m2, LoraConfig(r=20, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 16})
        )


def test_unwrappable_conv_is_refused_before_any_change():
    model = conv_net()
    model.conv1d = torch.nn.Conv1d(8, 8, 3, padding=1, groups=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="grouped"):
        inject(model, LoraConfig(r=2, target_modules=["conv", "conv1d"]))
    assert not _wrapped(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
