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


# --------------------------------------------------------------------------- released prompt style
# The released code's prompt strings, transcribed from its dataset converters for this test.
RELEASED_THINKLITE = ("{Question}\nOutput the thinking process in <think> </think> and final "
                      "answer in <answer> </answer> tags.")
RELEASED_SAT = ("{Question}  Output the thinking process in <think> </think> and final answer "
                "(option) in <answer> </answer> tags.")
RELEASED_REFCOCO = ("{Question}\nOutput the final answer in <answer> </answer> tags. The output "
                    "answer format should be as follows:\n<answer>[x1, y1, x2, y2]</answer>\n"
                    "Please strictly follow the format.")
RELEASED_OCR = "{Question}\nOutput the final answer in <answer> </answer> tags."


@pytest.mark.parametrize("name, template", [
    ("thinklite_released", RELEASED_THINKLITE), ("refcoco_released", RELEASED_REFCOCO),
    ("ocr_llava_released", RELEASED_OCR), ("geoqav_released", RELEASED_SAT),
    ("sat_released", RELEASED_SAT), ("scienceqa_released", RELEASED_SAT),
    ("lisa_released", "{Question}")])
def test_released_prompts_are_the_released_strings(name, template):
    assert tasks.get_task(name).format_prompt("  What is shown? \n") == template.format(
        Question="What is shown?")


def test_released_rewards_targets_and_objectives():
    assert tasks.objective_names(["thinklite_released", "refcoco_released",
                                  "ocr_llava_released"]) == [
        "thinklite_released/accuracy_released", "thinklite_released/format_think",
        "refcoco_released/iou", "refcoco_released/format_answer", "ocr_llava_released/ntp"]
    rlvr = tasks.objective_names(["lisa_released", "geoqav_released", "sat_released",
                                  "scienceqa_released"])
    assert len(rlvr) == 8 and all(n.endswith(("/format_think_strict", "/accuracy_released",
                                              "/iou_thresholded")) for n in rlvr)
    ocr = tasks.get_task("ocr_llava_released")
    assert ocr.sft_loss == "conversation" and ocr.format_target(" 12 ab ") == "<answer>12 ab</answer>"
    assert tasks.get_task("ocr_llava").sft_loss == "answer"
    # a warm-start target of a strict-format task earns the strict format reward
    for name in ("sat_released", "lisa_released"):
        task = tasks.get_task(name)
        assert rewards.format_think_strict(task.format_target("B")) == 1.0
        assert task.eval_metrics[-1] == "format_think_strict"


def test_styled_task_name():
    assert tasks.styled_task_name("thinklite", "bare") == "thinklite"
    assert tasks.styled_task_name("thinklite", "released") == "thinklite_released"
    assert tasks.styled_task_name("sat_released", "released") == "sat_released"
    with pytest.raises(ValueError, match="no released prompt style"):
        tasks.styled_task_name("reasoning", "released")  # the synthetic tasks keep theirs
    with pytest.raises(ValueError, match="prompt style must be one of"):
        tasks.styled_task_name("thinklite", "fancy")
    assert set(tasks.RELEASED_VARIANTS.values()) <= set(tasks.TASKS)


def test_sft_loss_is_checked():
    with pytest.raises(ValueError, match="sft_loss must be one of"):
        tasks.Task(name="x", kind="sft", prompt_template="{question}", sft_loss="prompt")
    with pytest.raises(ValueError, match="sft tasks only"):
        tasks.Task(name="x", kind="rl", prompt_template="{question}", rewards=("accuracy",),
                   sft_loss="conversation")
