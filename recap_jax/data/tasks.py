"""Task registry: what a source asks, how it is scored, and which objectives it contributes.

A *task* describes one data source (recap-method.md, "Objectives"):
- ``kind="rl"``: prompts are sampled G times and each reward function in ``rewards`` scores
  every completion; each (source, reward) pair is one RECAP objective ``<source>/<reward>``.
- ``kind="sft"``: next-token prediction on the reference answer; one objective
  ``<source>/ntp``.

The K objectives of a training mix, in the fixed order used for the weight vector lambda
(shape [K]), come from :func:`objective_names`.

Prompt styles. Every paper source has two registered tasks: ``<name>`` ("bare": our prompts,
the question + " " + the instruction, our `accuracy` reward) and ``<name>_released`` (the
strings, targets and rewards of the authors' released code, recap-method.md "Released-code
details"). A config selects the released style per source by its key in ``data.sources``
(e.g. ``thinklite_released`` with adapter kind ``thinklite``), or through
:func:`styled_task_name`. The synthetic demo tasks have only their own style.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

from recap_jax import rewards as rewards_lib

__all__ = [
    "ANSWER_SUFFIX",
    "PROMPT_STYLES",
    "RELEASED_ANSWER_SUFFIX",
    "RELEASED_REASONING_SUFFIX",
    "RELEASED_REFCOCO_SUFFIX",
    "RELEASED_RLVR_SUFFIX",
    "RELEASED_VARIANTS",
    "unstyled_task_name",
    "SFT_LOSS_SPANS",
    "GROUNDING_QUESTION",
    "NTP",
    "TASKS",
    "THINK_SUFFIX",
    "Task",
    "get_task",
    "objective_names",
    "register_task",
    "styled_task_name",
]

THINK_SUFFIX = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
ANSWER_SUFFIX = "Output the final answer in <answer> </answer> tags."
# VLM-R1's referring-expression question; the phrase is formatted in.
GROUNDING_QUESTION = (
    "Please provide the bounding box coordinate of the region this sentence describes: {phrase}."
)
NTP = "ntp"

# The released code's prompt strings (exact; recap-method.md, "Released-code details").
# ThinkLite: the instruction on a new line after the question.
RELEASED_REASONING_SUFFIX = "\n" + THINK_SUFFIX
# RLVR-only (SAT, GeoQAV, ScienceQA): two spaces after the question, "final answer (option)".
RELEASED_RLVR_SUFFIX = ("  Output the thinking process in <think> </think> and final answer "
                        "(option) in <answer> </answer> tags.")
# RefCOCO grounding replay: the box-format example.
RELEASED_REFCOCO_SUFFIX = ("\nOutput the final answer in <answer> </answer> tags. The output "
                           "answer format should be as follows:\n<answer>[x1, y1, x2, y2]"
                           "</answer>\nPlease strictly follow the format.")
# OCR SFT replay.
RELEASED_ANSWER_SUFFIX = "\n" + ANSWER_SUFFIX
PROMPT_STYLES = ("bare", "released")
SFT_LOSS_SPANS = ("answer", "conversation")


@dataclasses.dataclass(frozen=True)
class Task:
    """One data source's role in training.

    Attributes:
      name: source name; objective names are ``<name>/<reward>`` or ``<name>/ntp``.
      kind: "rl" (verifiable rewards on sampled completions) or "sft" (NTP on references).
      prompt_template: user text around the record's question; must contain ``{question}``.
      rewards: names in ``recap_jax.rewards.REWARDS``; one RECAP objective each (rl only).
      eval_metrics: names in ``recap_jax.rewards.REWARDS`` used at evaluation; the first is
        the headline metric.
      answer_kind: "text" or "box" (reference is ``[x1, y1, x2, y2]`` in original pixels).
      description: one line for humans.
      target_template: the completion an SFT warm-start teaches for this task, around the
        reference answer text ``{answer}`` (e.g. ``<think></think><answer>{answer}</answer>``
        for a think-format task), so that the warm-started policy earns format rewards. For
        an sft task it is also the replay target (released OCR: ``<answer>{answer}</answer>``).
      sft_loss: sft tasks only: "answer" (NTP on the target's tokens) or "conversation" (the
        released OCR replay: NTP on every non-pad, non-image token of the conversation, the
        prompt included; see recap_jax.data.sft_targets).
    """

    name: str
    kind: Literal["rl", "sft"]
    prompt_template: str
    rewards: tuple[str, ...] = ()
    eval_metrics: tuple[str, ...] = ("accuracy",)
    answer_kind: Literal["text", "box"] = "text"
    description: str = ""
    target_template: str = "{answer}"
    sft_loss: Literal["answer", "conversation"] = "answer"

    def __post_init__(self):
        where = f"task {self.name!r}"
        if not self.name or "/" in self.name:
            raise ValueError(f"{where}: name must be non-empty and contain no '/'")
        if self.kind not in ("rl", "sft"):
            raise ValueError(f"{where}: kind must be 'rl' or 'sft', got {self.kind!r}")
        if "{question}" not in self.prompt_template:
            raise ValueError(f"{where}: prompt_template must contain '{{question}}'")
        if self.kind == "rl" and not self.rewards:
            raise ValueError(f"{where}: an rl task needs at least one reward")
        if self.kind == "sft" and self.rewards:
            raise ValueError(f"{where}: an sft task has no rewards (its objective is ntp)")
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"{where}: duplicate rewards {self.rewards}")
        for name in (*self.rewards, *self.eval_metrics):
            if name not in rewards_lib.REWARDS:
                raise ValueError(f"{where}: unknown reward/metric {name!r}; "
                                 f"known: {sorted(rewards_lib.REWARDS)}")
        if not self.eval_metrics:
            raise ValueError(f"{where}: needs at least one eval metric")
        if self.answer_kind not in ("text", "box"):
            raise ValueError(f"{where}: answer_kind must be 'text' or 'box'")
        if "{answer}" not in self.target_template:
            raise ValueError(f"{where}: target_template must contain '{{answer}}'")
        if self.sft_loss not in SFT_LOSS_SPANS:
            raise ValueError(f"{where}: sft_loss must be one of {SFT_LOSS_SPANS}, "
                             f"got {self.sft_loss!r}")
        if self.kind == "rl" and self.sft_loss != "answer":
            raise ValueError(f"{where}: sft_loss applies to sft tasks only")

    @property
    def objectives(self) -> tuple[str, ...]:
        """This task's objective names, ``<name>/<reward>`` (rl) or ``<name>/ntp`` (sft)."""
        if self.kind == "sft":
            return (f"{self.name}/{NTP}",)
        return tuple(f"{self.name}/{reward}" for reward in self.rewards)

    @property
    def eval_metric(self) -> str:
        """The headline evaluation metric."""
        return self.eval_metrics[0]

    def format_prompt(self, question: str) -> str:
        """The user text for one record's question (the image goes in via the processor)."""
        return self.prompt_template.format(question=question.strip())

    def format_target(self, answer_text: str) -> str:
        """The warm-start completion for a reference answer (see ``target_template``)."""
        return self.target_template.replace("{answer}", answer_text.strip())

    def reward_fns(self) -> tuple[rewards_lib.RewardFn, ...]:
        """The reward functions, in objective order."""
        return tuple(rewards_lib.REWARDS[name] for name in self.rewards)


THINK_TARGET = "<think></think><answer>{answer}</answer>"
ANSWER_TARGET = "<answer>{answer}</answer>"
# Think-format target that satisfies format_think_strict as well (newlines around bodies).
STRICT_THINK_TARGET = "<think>\n\n</think>\n<answer>\n{answer}\n</answer>"


def _rl(name, suffix, rewards, eval_metrics, description, answer_kind="text", *,
        template=None) -> Task:
    """An RL task; its evaluation also reports its format reward (the one in ``rewards``, or
    format_think / format_answer by the suffix): RL on another task can break a task's
    answer format before its accuracy. ``template`` overrides "{question} " + suffix."""
    think = "think" in suffix
    target = ((STRICT_THINK_TARGET if "format_think_strict" in rewards else THINK_TARGET)
              if think else ANSWER_TARGET)
    format_metric = next((r for r in rewards if r.startswith("format_")),
                         "format_think" if think else "format_answer")
    return Task(name=name, kind="rl", prompt_template=template or "{question} " + suffix,
                rewards=rewards, eval_metrics=(*eval_metrics, format_metric),
                answer_kind=answer_kind, description=description, target_template=target)


def _released(name, suffix, rewards, eval_metrics, description, answer_kind="text") -> Task:
    """The released variant ``<name>_released``: the question (stripped) + ``suffix`` with no
    separator (each released suffix carries its own newline or two spaces)."""
    return _rl(f"{name}_released", suffix, rewards, eval_metrics, description, answer_kind,
               template="{question}" + suffix)


_BUILTINS = (
    # Offline synthetic suite (recap_jax.data.synthetic): the demo's hybrid setting, K = 5.
    _rl("reasoning", THINK_SUFFIX, ("accuracy", "format_think"), ("accuracy",),
        "synthetic counting/arithmetic over drawn shapes, digits and bars"),
    _rl("grounding", ANSWER_SUFFIX, ("iou", "format_answer"), ("iou", "iou_thresholded"),
        "synthetic referring expression -> box", answer_kind="box"),
    Task("ocr", "sft", "{question}", eval_metrics=("ocr_char_f1", "ocr_exact"),
         description="synthetic rendered text -> transcription"),
    # The paper's hybrid setting.
    _rl("thinklite", THINK_SUFFIX, ("accuracy", "format_think"), ("accuracy",),
        "ThinkLite-VL-70k reasoning RL"),
    _rl("refcoco", ANSWER_SUFFIX, ("iou", "format_answer"), ("iou", "iou_thresholded"),
        "RefCOCO/+/g grounding replay (VLM-R1 jsonl)", answer_kind="box"),
    Task("ocr_llava", "sft", "{question}", eval_metrics=("ocr_char_f1", "ocr_exact"),
         description="LLaVA-OneVision OCR subsets, SFT replay"),
    # The paper's RLVR-only setting (K = 8: 4 sources x {accuracy or iou, format_think}).
    _rl("lisa", THINK_SUFFIX, ("iou_thresholded", "format_think"), ("iou", "iou_thresholded"),
        "LISA-train grounding (IoU > 0.5 reward)", answer_kind="box"),
    _rl("geoqav", THINK_SUFFIX, ("accuracy", "format_think"), ("accuracy",), "GeoQAV geometry"),
    _rl("sat", THINK_SUFFIX, ("accuracy", "format_think"), ("accuracy",), "SAT spatial reasoning"),
    _rl("scienceqa", THINK_SUFFIX, ("accuracy", "format_think"), ("accuracy",),
        "ScienceQA multiple choice"),
    # The released code's prompts, targets and rewards for the same sources.
    _released("thinklite", RELEASED_REASONING_SUFFIX, ("accuracy_released", "format_think"),
              ("accuracy_released", "accuracy"), "ThinkLite-VL-70k, released prompt/rewards"),
    _released("refcoco", RELEASED_REFCOCO_SUFFIX, ("iou", "format_answer"),
              ("iou", "iou_thresholded"), "RefCOCO replay, released box-format prompt",
              answer_kind="box"),
    Task("ocr_llava_released", "sft", "{question}" + RELEASED_ANSWER_SUFFIX,
         eval_metrics=("ocr_char_f1", "ocr_exact"), target_template=ANSWER_TARGET,
         sft_loss="conversation",
         description="LLaVA-OneVision OCR replay, released prompt/target/conversation loss"),
    # Released LISA prompts are the dataset's own problem text (no suffix added).
    _rl("lisa_released", THINK_SUFFIX, ("iou_thresholded", "format_think_strict"),
        ("iou", "iou_thresholded"), "LISA-train, released rewards (prompt: the record's text)",
        answer_kind="box", template="{question}"),
    _released("geoqav", RELEASED_RLVR_SUFFIX, ("accuracy_released", "format_think_strict"),
              ("accuracy_released", "accuracy"), "GeoQAV, released prompt/rewards"),
    _released("sat", RELEASED_RLVR_SUFFIX, ("accuracy_released", "format_think_strict"),
              ("accuracy_released", "accuracy"), "SAT, released prompt/rewards"),
    _released("scienceqa", RELEASED_RLVR_SUFFIX, ("accuracy_released", "format_think_strict"),
              ("accuracy_released", "accuracy"), "ScienceQA, released prompt/rewards"),
)

TASKS: dict[str, Task] = {task.name: task for task in _BUILTINS}
# base task -> its released variant
RELEASED_VARIANTS: dict[str, str] = {
    name: f"{name}_released"
    for name in ("thinklite", "refcoco", "ocr_llava", "lisa", "geoqav", "sat", "scienceqa")}


def styled_task_name(name: str, style: str) -> str:
    """The task a source ``name`` uses under prompt style ``style``: "bare" -> ``name``,
    "released" -> ``<name>_released`` (ValueError naming what exists)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "bare" or name in RELEASED_VARIANTS.values():
        return name
    if name not in RELEASED_VARIANTS:
        raise ValueError(f"task {name!r} has no released prompt style; sources with one: "
                         f"{sorted(RELEASED_VARIANTS)}")
    return RELEASED_VARIANTS[name]


def unstyled_task_name(name: str) -> str:
    """The source a task stands for: ``<name>_released`` -> ``name``; other names unchanged."""
    released = {styled: plain for plain, styled in RELEASED_VARIANTS.items()}
    return released.get(name, name)


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Adds ``task`` to :data:`TASKS` (ValueError if the name is taken, unless overwrite)."""
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered; pass overwrite=True")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called ``name`` (ValueError naming the known ones)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def objective_names(task_names: Sequence[str] | Iterable[str]) -> list[str]:
    """The objective names of a training mix, in a stable order: tasks in the given order,
    each task's rewards in its declared order (``<source>/<reward>``, ``<source>/ntp``).

    This order indexes the RECAP weight vector lambda. Duplicate task names are an error.
    """
    task_names = list(task_names)
    duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tasks listed more than once: {duplicates}")
    return [objective for name in task_names for objective in get_task(name).objectives]
