"""The tfds builder writes and reads the synthetic suite offline, matching the python path."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from recap_jax.data import synthetic, synthetic_tfds  # noqa: E402


def test_build_and_load_offline_equals_the_plain_generator(tmp_path):
    kwargs = dict(num_train=6, num_eval=3, seed=4, image_size=(56, 84))
    synthetic_tfds.build("grounding", tmp_path, **kwargs)
    for split, count in (("train", 6), ("eval", 3)):
        dataset = synthetic_tfds.load("grounding", split, tmp_path, **kwargs)
        loaded = {r.id: r for r in map(synthetic_tfds.record_from_example, tfds.as_numpy(dataset))}
        expected = list(synthetic.generate("grounding", split, count, seed=4, image_size=(56, 84)))
        assert sorted(loaded) == sorted(r.id for r in expected)
        for record in expected:
            twin = loaded[record.id]
            np.testing.assert_array_equal(twin.image, record.image)
            assert (twin.question, twin.answer, twin.source) == (
                record.question, record.answer, record.source)


def test_load_fails_clearly_when_not_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not built .* call .*build"):
        synthetic_tfds.load("ocr", "train", tmp_path, num_train=2, num_eval=1)


def test_config_names_encode_non_default_parameters():
    assert synthetic_tfds.config_name("ocr") == "ocr"
    assert synthetic_tfds.config_name("ocr", seed=1) == "ocr-s1-56x112-n2000-200"
    assert synthetic_tfds.config_name("reasoning", num_train=5, num_eval=2,
                                      image_size=(56, 56)) == "reasoning-s0-56x56-n5-2"
