"""Tasks are plug-ins: found by name, unknown names refused with the list of known ones."""

import pytest

from lorafit.tasks import Task, get_task, register_task, task_names


def test_builtin_tasks_are_registered():
    assert {"causal-lm", "classification"} <= set(task_names())
    assert get_task("classification").peft_task_type == "SEQ_CLS"
    assert get_task("causal-lm").peft_task_type == "CAUSAL_LM"


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'seq2seq'; choose one of: .*causal-lm"):
        get_task("seq2seq")


def test_a_new_task_is_one_registered_class():
    @register_task
    class Echo(Task):
        name = "echo-test"
        peft_task_type = "FEATURE_EXTRACTION"
        head = "causal-lm"

    try:
        assert isinstance(get_task("echo-test"), Echo) and "echo-test" in task_names()
    finally:
        from lorafit.tasks import base

        base._TASKS.pop("echo-test")


def test_a_folder_is_claimed_by_its_task_marker_files(tmp_path):
    from lorafit.tasks import task_of_folder

    assert task_of_folder(tmp_path).name == "causal-lm"  # unmarked: the default task
    assert task_of_folder(tmp_path, "SEQ_CLS").name == "classification"
    (tmp_path / "labels.json").write_text('["neg", "pos"]')
    assert task_of_folder(tmp_path, "CAUSAL_LM").name == "classification"
