import asyncio
import copy
import re
import threading

import pytest
import torch

from helpers import model_input, outputs, randomize_adapters, tiny_bert, tiny_llama
from lorafit import (
    LoraConfig,
    LoraLayer,
    add_weighted_adapter,
    active_adapters,
    adapter_names,
    adapter_rows,
    delete_adapter,
    disable_adapter,
    forward_with_adapters,
    inject,
    merge,
    per_sample_adapters,
    set_active,
)
from lorafit.tuner.state import check_new_adapter_name


def _two_adapters(seed=0):
    model = tiny_llama(seed)
    x = model_input("llama")
    base = outputs(model, x)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    inject(
        model,
        LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"], use_rslora=True),
        "b",
    )
    randomize_adapters(model)
    return model, x, base


def test_activate_switch_and_sum():
    model, x, base = _two_adapters()
    set_active(model, "a")
    ya = outputs(model, x)
    set_active(model, "b")
    yb = outputs(model, x)
    assert active_adapters(model) == ["b"]
    assert not torch.allclose(ya, yb)
    set_active(model, ["a", "b"])
    both = outputs(model, x)
    assert not torch.allclose(both, ya) and not torch.allclose(both, yb)
    with pytest.raises(KeyError, match="no adapter named"):
        set_active(model, "nope")


def test_disable_adapter_equals_base_even_when_merged():
    model, x, base = _two_adapters()
    set_active(model, ["a", "b"])
    with disable_adapter(model):
        torch.testing.assert_close(outputs(model, x), base, atol=1e-6, rtol=0)
    adapted = outputs(model, x)
    merge(model)
    with disable_adapter(model):
        torch.testing.assert_close(outputs(model, x), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_delete_adapter_unwraps_when_empty():
    model, x, base = _two_adapters()
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert not isinstance(model.model.layers[0].self_attn.o_proj, LoraLayer)  # only "b" had it
    delete_adapter(model, "a")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(outputs(model, x), base, atol=0, rtol=0)


def _delta(model, name, path):
    layer = model.get_submodule(path)
    return layer.delta_weight(name) if name in layer.adapters else 0


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_weighted_combination_is_weighted_sum_of_updates(how):
    model, x, base = _two_adapters()
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "mix", combination_type=how, svd_rank=6)
    for path in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
    ]:
        want = 0.7 * _delta(model, "a", path) - 1.3 * _delta(model, "b", path)
        torch.testing.assert_close(_delta(model, "mix", path), want, atol=1e-5, rtol=1e-4)
    # and the combined adapter runs like the base with 0.7 dW_a - 1.3 dW_b folded in
    set_active(model, "mix")
    mixed = outputs(model, x)
    dense = copy.deepcopy(model)
    for path, layer in dense.named_modules():
        if isinstance(layer, LoraLayer):
            layer.write_weight(
                layer.out_major_weight()
                + 0.7 * _delta(dense, "a", path)
                - 1.3 * _delta(dense, "b", path)
            )
    with disable_adapter(dense):
        want = outputs(dense, x)
    assert not torch.allclose(want, base, atol=1e-3)  # the combination changes something
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-4)


def test_svd_truncation_keeps_top_directions():
    model, _, _ = _two_adapters()
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=1)
    path = "model.layers.0.self_attn.q_proj"
    full = _delta(model, "a", path) + _delta(model, "b", path)
    s = torch.linalg.svdvals(full)
    got = torch.linalg.svdvals(_delta(model, "low", path))
    assert got[0] == pytest.approx(s[0].item(), rel=1e-4) and got[1] < 1e-4


def test_linear_combination_follows_peft_factor_mix():
    model = tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "a")
    inject(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "lin", combination_type="linear")
    layer = model.model.layers[0].self_attn.q_proj
    a, b, lin = (layer.adapters[n] for n in ("a", "b", "lin"))
    torch.testing.assert_close(lin.A, (0.5 * 2) ** 0.5 * a.A + (2.0 * 1) ** 0.5 * b.A)
    torch.testing.assert_close(lin.B, (0.5 * 2) ** 0.5 * a.B + (2.0 * 1) ** 0.5 * b.B)
    assert lin.scale == 1.0
    m2, _, _ = _two_adapters()
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(m2, ["a", "b"], [1, 1], "x", combination_type="linear")


def test_per_sample_adapters_match_separate_runs():
    model, x, base = _two_adapters()
    ids = torch.cat([x["input_ids"], x["input_ids"][:1]], 0)  # 3 rows
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    singles = {}
    for name in ("a", "b"):
        set_active(model, name)
        singles[name] = outputs(model, inp)
    with disable_adapter(model):
        singles["__base__"] = outputs(model, inp)
    names = ["a", "__base__", "b"]
    with per_sample_adapters(model, names):
        mixed = outputs(model, inp)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], atol=1e-5, rtol=1e-5)


def _rows_batch(names, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (len(names), 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_forward_with_adapters_is_per_call_and_checks_names():
    model, x, base = _two_adapters()
    names = ["b", "a"]
    with per_sample_adapters(model, names) as same:  # the old name still works
        assert same is model
        want = outputs(model, x)
    got = forward_with_adapters(model, names, **x).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    set_active(model, "a")
    torch.testing.assert_close(
        outputs(model, x)[1], want[1], atol=1e-5, rtol=1e-5
    )  # nothing left set
    assert not any(hasattr(m, "sample_adapters") for m in model.modules())
    with pytest.raises(KeyError, match="no adapter named"):
        forward_with_adapters(model, ["a", "typo"], **x)
    with adapter_rows(None):  # no per-row choice: the active adapters
        torch.testing.assert_close(
            outputs(model, x),
            forward_with_adapters(model, ["a", "a"], **x).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_adapter_rows_around_generate():
    model, _, _ = _two_adapters()
    prompt = _rows_batch(["x", "y", "z"], seed=4)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    singles = {}
    for name in ("a", "b"):
        set_active(model, name)
        singles[name] = model.generate(**prompt, **kw)
    with disable_adapter(model):
        singles["__base__"] = model.generate(**prompt, **kw)
    names = ["b", "__base__", "a"]
    with adapter_rows(names, model):
        mixed = model.generate(**prompt, **kw)
    for i, n in enumerate(names):
        assert torch.equal(mixed[i], singles[n][i]), (i, n)


def test_concurrent_threads_with_different_rows_get_their_own_outputs():
    """Two threads run mixed batches (different names, different batch sizes) on one model at the
    same time; each must get exactly what a sequential run gives. With the choice stored on the
    modules, one thread's names would leak into the other's forward."""
    model, _, _ = _two_adapters()
    jobs = {"t1": ["a", "__base__", "b"], "t2": ["b", "a"]}
    inputs = {t: _rows_batch(names, seed=i) for i, (t, names) in enumerate(jobs.items())}
    sequential = {t: forward_with_adapters(model, jobs[t], **inputs[t]).logits for t in jobs}
    results = {t: [] for t in jobs}
    errors = []
    start = threading.Barrier(len(jobs))

    def work(t):
        try:
            start.wait()
            for _ in range(30):
                with torch.no_grad():
                    results[t].append(forward_with_adapters(model, jobs[t], **inputs[t]).logits)
        except Exception as exc:  # noqa: BLE001  (reported below, with the thread)
            errors.append(f"{t}: {exc!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in jobs:
        assert len(results[t]) == 30
        assert all(torch.equal(r, sequential[t]) for r in results[t]), t


def test_asyncio_tasks_see_their_own_rows():
    model, x, _ = _two_adapters()
    with disable_adapter(model):
        base = outputs(model, x)
    want = {n: forward_with_adapters(model, [n, n], **x).logits for n in ("a", "b")}

    async def run(name):
        with adapter_rows([name, name], model):
            await asyncio.sleep(0)  # the other task runs here, inside its own block
            first = outputs(model, x)
            await asyncio.sleep(0)
            return first, outputs(model, x)

    async def main():
        return await asyncio.gather(run("a"), run("b"))

    (a1, a2), (b1, b2) = asyncio.run(main())
    for got in (a1, a2):
        torch.testing.assert_close(got, want["a"], atol=0, rtol=0)
    for got in (b1, b2):
        torch.testing.assert_close(got, want["b"], atol=0, rtol=0)
    set_active(model, [])
    torch.testing.assert_close(outputs(model, x), base, atol=1e-6, rtol=0)  # nothing leaked out


def test_rows_reach_trained_copies():
    model = tiny_bert()
    inject(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    inject(model, LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]), "b")
    randomize_adapters(model)
    x = model_input("bert", batch=2)
    singles = {n: forward_with_adapters(model, [n, n], **x).logits for n in ("a", "b")}
    mixed = forward_with_adapters(model, ["b", "a"], **x).logits
    torch.testing.assert_close(mixed[0], singles["b"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], singles["a"][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["", "a.b", "__base__", "a", 3])
def test_one_check_for_new_adapter_names(name):
    """inject, load_adapter and add_weighted_adapter refuse the same names, with one message."""
    model = tiny_llama()
    inject(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(ValueError, match="adapter name|reserved|already has") as err:
        check_new_adapter_name(model, name)
    with pytest.raises(ValueError, match=re.escape(str(err.value))):
        inject(model, LoraConfig(r=2, target_modules=["q_proj"]), name)
    with pytest.raises(ValueError, match=re.escape(str(err.value))):
        add_weighted_adapter(model, ["a"], [1.0], name, combination_type="cat")
    assert adapter_names(model) == ["a"]
