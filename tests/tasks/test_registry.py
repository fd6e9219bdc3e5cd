"""Tasks are registered and found through the public registry API: a class names itself, a builder picks it."""
import pytest
from torch import nn

from bgd_det.config import get_cfg
from bgd_det.modeling import ARCH_REGISTRY
from bgd_det.tasks import TASK_REGISTRY, Task, build_task


def test_a_custom_task_is_registered_by_decorator_and_picked_by_its_name():
    if "OneLayerTask" not in TASK_REGISTRY:
        @TASK_REGISTRY.register()
        class OneLayerTask(Task):
            name = "one_layer"

    if "one_layer_net" not in ARCH_REGISTRY:
        @ARCH_REGISTRY.register()
        def one_layer_net(cfg):
            return nn.Linear(4, cfg.MODEL.NUM_CLASSES)

        one_layer_net.task = "one_layer"

    cfg = get_cfg()
    cfg.MODEL.ARCH = "one_layer_net"
    assert type(build_task(cfg)).__name__ == "OneLayerTask"
    ARCH_REGISTRY.get("one_layer_net").task = "no_such_task"
    try:
        with pytest.raises(KeyError, match=r"unknown task 'no_such_task'; registered tasks: \['classification', "
                                           r"'detection', 'one_layer'\]"):
            build_task(cfg)
    finally:
        ARCH_REGISTRY.get("one_layer_net").task = "one_layer"
