"""padding_plan: the one rule that turns a conv's padding into (pre-pad, mode, op padding), against the conv itself."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgd_det.inference import padding_plan


@pytest.mark.parametrize("make, want", [
    (lambda: nn.Conv2d(2, 3, 3, padding=1), (None, "constant", (1, 1))),
    (lambda: nn.Conv2d(2, 3, (3, 5), padding="same"), (None, "constant", (1, 2))),
    (lambda: nn.Conv2d(2, 3, 4, padding="same"), ((1, 2, 1, 2), "constant", (0, 0))),  # asymmetric "same"
    (lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect"), ((2, 2, 1, 1), "reflect", (0, 0))),
    (lambda: nn.Conv1d(2, 3, 5, padding="same"), (None, "constant", (2,))),
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), ((1, 2), "constant", (0,))),
    (lambda: nn.Conv1d(2, 3, 3, padding="valid"), (None, "constant", (0,))),
    (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), ((1, 1), "circular", (0,))),
])
def test_padding_plan_reproduces_the_convolution(make, want):
    torch.manual_seed(0)
    conv = make()
    plan = padding_plan(conv)
    assert plan == want
    pre_pad, mode, padding = plan
    x = torch.randn(2, 2, *([9, 11] if isinstance(conv, nn.Conv2d) else [13]))
    y = F.pad(x, pre_pad, mode=mode) if pre_pad is not None else x
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    got = fn(y, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
    torch.testing.assert_close(got, conv(x))
