"""Task registry: objective names and order (the paper's K = 5 and K = 8), prompts, checks."""

import pytest

from recap_jax import rewards
from recap_jax.data import tasks

THINK = ("Output the thinking process in <think> </think> and final answer in <answer> "
         "</answer> tags.")
ANSWER = "Output the final answer in <answer> </answer> tags."


def test_hybrid_setting_has_the_papers_five_objectives_in_order():
    assert tasks.objective_names(["reasoning", "grounding", "ocr"]) == [
        "reasoning/accuracy", "reasoning/format_think", "grounding/iou",
        "grounding/format_answer", "ocr/ntp"]
    assert tasks.objective_names(["thinklite", "refcoco", "ocr_llava"]) == [
        "thinklite/accuracy", "thinklite/format_think", "refcoco/iou",
        "refcoco/format_answer", "ocr_llava/ntp"]


def test_rlvr_only_setting_has_eight_objectives():
    names = tasks.objective_names(["lisa", "geoqav", "sat", "scienceqa"])
    assert len(names) == 8
    assert names[:2] == ["lisa/iou_thresholded", "lisa/format_think"]
    assert all(name.endswith(("/accuracy", "/format_think", "/iou_thresholded")) for name in names)


def test_objective_order_follows_the_task_list_and_rejects_duplicates():
    assert tasks.objective_names(["ocr", "reasoning"]) == [
        "ocr/ntp", "reasoning/accuracy", "reasoning/format_think"]
    assert tasks.objective_names([]) == []
    with pytest.raises(ValueError, match="more than once"):
        tasks.objective_names(["ocr", "ocr"])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.objective_names(["nope"])


@pytest.mark.parametrize("name, suffix", [
    ("reasoning", THINK), ("thinklite", THINK), ("lisa", THINK), ("scienceqa", THINK),
    ("grounding", ANSWER), ("refcoco", ANSWER)])
def test_prompt_suffixes_are_the_papers(name, suffix):
    assert tasks.get_task(name).format_prompt("  How many? ") == "How many? " + suffix


def test_sft_prompts_have_no_suffix_and_rl_rewards_resolve():
    assert tasks.get_task("ocr").format_prompt("Read it.") == "Read it."
    for task in tasks.TASKS.values():
        assert task.kind in ("rl", "sft")
        assert task.reward_fns() == tuple(rewards.REWARDS[n] for n in task.rewards)
        assert task.eval_metric in rewards.REWARDS


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="rl", prompt_template="{question}"), "at least one reward"),
    (dict(kind="sft", prompt_template="{question}", rewards=("accuracy",)), "no rewards"),
    (dict(kind="rl", prompt_template="{question}", rewards=("bleu",)), "unknown reward"),
    (dict(kind="rl", prompt_template="no placeholder", rewards=("accuracy",)), "{question}"),
    (dict(kind="dpo", prompt_template="{question}"), "kind"),
])
def test_invalid_tasks_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tasks.Task(name="mine", **kwargs)


def test_register_task_refuses_silent_overwrite():
    task = tasks.Task(name="helper_test_task", kind="sft", prompt_template="{question}")
    try:
        tasks.register_task(task)
        with pytest.raises(ValueError, match="already registered"):
            tasks.register_task(task)
        assert tasks.objective_names(["helper_test_task"]) == ["helper_test_task/ntp"]
    finally:
        tasks.TASKS.pop("helper_test_task", None)
