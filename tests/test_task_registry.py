"""Tasks as plugins: the ``tasks`` registry kind, its protocol check and the built-in tasks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from trimkit import hookimpl
from trimkit import plugins as P
from trimkit.protocols import Metric, Task
from trimkit.registry import RegistrationError, TrimkitRegistry

BUILTIN_TASKS = {"classification", "vqa", "nlvr2", "snli_ve", "captioning", "retrieval"}


class GoodTask:
    name, main_metric = "mine", "accuracy"

    def loss(self, logits, labels):
        return logits.sum() * 0

    def distill(self, logits, full_logits, labels):
        return (logits - full_logits).pow(2).mean()

    def metric(self):
        from trimkit_train.tasks import AccuracyMetric
        return AccuracyMetric()


def test_builtin_tasks_are_registered_and_follow_the_protocol():
    registry = P.get_registry()
    assert BUILTIN_TASKS <= set(registry.tasks.names())
    for name in BUILTIN_TASKS:
        task = registry.tasks.get(name)
        assert isinstance(task, Task) and task.name == name
        assert registry.tasks.source(name).startswith("tasks (trimkit")
        m = task.metric()
        assert isinstance(m, Metric)
    assert {"kind": "tasks", "name": "vqa", "source": registry.tasks.source("vqa")} in P.describe_plugins()


def test_get_task_follows_the_dataset():
    from trimkit_train.tasks import get_task

    class Plain:  # digit-grid and any dataset without a `task` attribute
        pass

    class VQA:
        task = "vqa"

    assert get_task(Plain()).name == "classification" and get_task(VQA()).name == "vqa"
    assert get_task("retrieval").name == "retrieval"


@pytest.mark.parametrize("broken, why", [
    ("no_loss", "without loss"),
    ("class", "the class GoodTask itself"),
    ("no_name", "'name'"),
    ("bad_distill", "distill cannot be called as distill"),
    ("metric_args", "metric cannot be called as metric()"),
])
def test_registry_refuses_tasks_that_do_not_fit(broken, why):
    registry = TrimkitRegistry()
    if broken == "class":
        obj = GoodTask
    else:
        obj = GoodTask()
        if broken == "no_loss":
            obj = type("NoLoss", (), {"name": "x", "main_metric": "m", "distill": GoodTask.distill,
                                      "metric": GoodTask.metric})()
        elif broken == "no_name":
            obj.name = ""
        elif broken == "bad_distill":
            obj.distill = lambda logits: logits
        elif broken == "metric_args":
            obj.metric = lambda dataset: None
    with pytest.raises(RegistrationError, match=why) as err:
        registry.tasks.register("x", obj)
    assert "trimkit.protocols.Task" in str(err.value)
    assert "x" not in registry.tasks
    registry.tasks.register("mine", GoodTask())
    assert "mine" in registry.tasks


def test_a_plugin_registers_a_task_through_the_hook():
    class Plugin:
        @hookimpl
        def trimkit_register_tasks(self, registry):
            registry.tasks.register("my_task", GoodTask())

    plugin = Plugin()
    try:
        registry = P.get_registry(plugins=[plugin])
        assert "my_task" in registry.tasks and BUILTIN_TASKS <= set(registry.tasks.names())
        task = registry.tasks.get("my_task")
        x = torch.randn(2, 3)
        assert float(task.distill(x, x, None)) == 0.0
    finally:
        P.get_plugin_manager().unregister(plugin)
        P.get_registry()


def test_tasks_plugin_imports_without_the_training_extras():
    from test_package_split import BLOCK  # accelerate, sklearn and matplotlib cannot be imported

    code = BLOCK + textwrap.dedent("""
        from trimkit import get_registry
        print("TASKS", get_registry().tasks.names())
        print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "pycocoevalcap"))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'vqa'" in proc.stdout and "'captioning'" in proc.stdout and "LOADED []" in proc.stdout
