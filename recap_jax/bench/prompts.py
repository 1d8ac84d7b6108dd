"""The paper's evaluation prompts (arXiv 2510.21978, evaluation setup).

Non-thinking: "{Question} Output the answer in <answer> </answer> tags."
Thinking: "{Question} Output the thinking process in <think> </think> and final answer
(option) in <answer> </answer> tags."
"""

from __future__ import annotations

__all__ = ["PROMPTS", "format_prompt"]

PROMPTS = {
    "plain": "{Question} Output the answer in <answer> </answer> tags.",
    "thinking": ("{Question} Output the thinking process in <think> </think> and final answer "
                 "(option) in <answer> </answer> tags."),
}


def format_prompt(question: str, style: str) -> str:
    """The user turn's text for ``question`` in prompt ``style`` ("plain" or "thinking")."""
    if style not in PROMPTS:
        raise ValueError(f"prompt style must be one of {sorted(PROMPTS)}, got {style!r}")
    return PROMPTS[style].replace("{Question}", question.strip())
