import torch
from torch import nn

from lorafit.tuner.rows import rows_context
from lorafit.tuner.trained_copy import TrainedCopy


def test_trained_copy_switches_with_active():
    head = nn.Linear(4, 2)
    holder = TrainedCopy(head)
    holder.add_copy("a")
    W0 = head.weight.detach().clone()
    copy_a = holder.copies["a"]
    assert copy_a.weight.data_ptr() != head.weight.data_ptr()  # its own storage, not a view
    with torch.no_grad():
        copy_a.weight.add_(1.0)
    assert torch.equal(head.weight, W0)  # training the copy leaves the original alone
    x = torch.randn(3, 4)
    torch.testing.assert_close(holder(x), head(x))
    holder.active = ["a"]
    torch.testing.assert_close(holder(x), copy_a(x))
    assert not torch.allclose(holder(x), head(x))
    holder(x).sum().backward()
    assert copy_a.weight.grad is not None and head.weight.grad is None
    holder.disabled = True
    torch.testing.assert_close(holder(x), head(x))


def test_trained_copy_rows():
    head = nn.Linear(4, 2)
    holder = TrainedCopy(head)
    holder.add_copy("a")
    with torch.no_grad():
        holder.copies["a"].weight.add_(1.0)
    x = torch.randn(3, 4)
    with rows_context(["a", "__base__", "a"]):
        out = holder(x)
    torch.testing.assert_close(out[[0, 2]], holder.copies["a"](x[[0, 2]]))
    torch.testing.assert_close(out[1], head(x[1]))
