"""The evaluator's teacher-forced metrics: answer NLL with the record's own image and with
another record's, against a plain forward of the model; and the image-reliance property (a
model whose image features are zero gains nothing from its own image)."""

import jax
import numpy as np
import pytest
from flax import nnx

from recap_jax import evaluator, plan, train
from tests.short_run import short_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = short_config(eval__num_examples=3, eval__batch_size=4,
                          **{f"data__sources__{n}__layout": "grid" for n in ("grounding", "ocr")})
    setup = train.build_run(plan.build_plan(config), str(tmp_path_factory.mktemp("evaluator")))
    # The rendered images differ in a few pixels, which a random model barely notices (NLL
    # moves by ~1e-6); noise images of the same size make "own vs other image" matter.
    rng = np.random.default_rng(0)
    for _, examples in setup.evaluator.tasks.values():
        for arrays, _ in examples:
            arrays["pixel_values"] = rng.normal(0, 3, arrays["pixel_values"].shape).astype(np.float32)
    return setup


def test_partners_share_the_image_size():
    grids = np.asarray([[1, 6, 6], [1, 6, 6], [1, 2, 12], [1, 6, 6], [1, 4, 4]])
    np.testing.assert_array_equal(evaluator.other_image_partners(grids), [1, 3, -1, 0, -1])


def _blind_to_images(setup):
    """Params whose vision merger outputs zeros: image features are 0 whatever the image."""
    model = nnx.merge(setup.graphdef, setup.initial_params)
    for weight in (model.visual.merger.mlp_2.kernel, model.visual.merger.mlp_2.bias):
        weight.value = jax.numpy.zeros_like(weight.value)
    return nnx.state(model)


def _reference_nll(setup, params, task_name, image_of):
    """Mean NLL per target token, from one full forward per record of prompt + target."""
    evaluator = setup.evaluator
    _, examples = evaluator.tasks[task_name]
    model = nnx.merge(setup.graphdef, params)
    total, tokens = 0.0, 0
    for row, (arrays, _) in enumerate(examples):
        target = arrays["target_ids"]
        image = examples[image_of[row]][0]
        ids = np.concatenate([arrays["input_ids"], target])[None]
        logits = np.asarray(model(ids, np.ones_like(ids), image["pixel_values"],
                                  image["image_grid_thw"][None]), np.float64)[0]
        logits = logits[len(arrays["input_ids"]) - 1:-1]  # the positions predicting the target
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        total -= log_probs[np.arange(len(target)), target].sum()
        tokens += len(target)
    return total / tokens


@pytest.mark.parametrize("task_name", ["grounding", "ocr"])
def test_answer_nll_with_own_and_other_image_equals_a_plain_forward(setup, task_name):
    params = setup.initial_params
    results = setup.evaluator(setup.graphdef, params, greedy=False)[task_name]
    count = len(setup.evaluator.tasks[task_name][1])
    assert results["image_reliance_rows"] == count  # grid images: one size, all paired
    own = _reference_nll(setup, params, task_name, list(range(count)))
    other = _reference_nll(setup, params, task_name, [(r + 1) % count for r in range(count)])
    np.testing.assert_allclose(results["answer_nll"], own, rtol=2e-5)
    np.testing.assert_allclose(results["answer_nll_other_image"], other, rtol=2e-5)
    assert abs(own - other) > 3e-5  # ~1e-4 here; float32 noise on the NLL is ~1e-6
    np.testing.assert_allclose(results["image_reliance"], other - own, rtol=1e-4, atol=1e-6)
    assert "completion_length" not in results  # greedy=False decodes nothing


def test_a_model_blind_to_images_relies_on_them_not_at_all(setup):
    params = _blind_to_images(setup)
    results = setup.evaluator(setup.graphdef, params, greedy=False)
    for task_name in ("grounding", "ocr"):
        assert results[task_name]["image_reliance"] == pytest.approx(0.0, abs=1e-6)
        assert results[task_name]["answer_nll"] > 0


def test_greedy_eval_reports_both_kinds_of_metric(setup):
    results = setup.evaluator(setup.graphdef, setup.initial_params)
    assert {"iou", "completion_length", "answer_nll", "image_reliance"} <= set(results["grounding"])
