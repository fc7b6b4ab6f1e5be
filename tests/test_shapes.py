import numpy as np
import pytest

from rapm_shapes.shapes import (
    ATTRIBUTES, RESOLUTION, all_prompts, caption, make_dataset, parse_caption, render, render_prompts, vocabulary,
)
from rapm_shapes.tokenizer import write_word_tokenizer
from rapm_core.errors import ConfigError


def test_dataset_is_a_pure_function_of_the_seed():
    a_img, a_attrs = make_dataset(16, seed=3)
    b_img, b_attrs = make_dataset(16, seed=3)
    c_img, _ = make_dataset(16, seed=4)
    assert a_img.shape == (16, RESOLUTION, RESOLUTION, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_attrs == b_attrs
    assert not np.array_equal(a_img, c_img)
    # item i depends only on (seed, i): a longer dataset starts with the shorter one
    assert np.array_equal(make_dataset(4, seed=3)[0], a_img[:4])


def test_same_attributes_render_with_real_variance():
    attrs = {"shape": "square", "colour": "red", "size": "small", "position": "left"}
    imgs = np.stack([render(attrs, np.random.default_rng(i)).astype(float) for i in range(32)])
    assert imgs.std(axis=0).mean() > 5  # jitter in place, size, hue and background, not a point mass


def test_caption_parse_round_trip_over_every_combination():
    prompts = all_prompts()
    n_combos = int(np.prod([len(v) for v in ATTRIBUTES.values()]))
    assert len(prompts) == len(set(prompts)) == n_combos
    for p in prompts:
        assert caption(parse_caption(p)) == p
    assert caption({"shape": "circle", "colour": "red", "size": "small", "position": "top"}) == \
        "a small red circle at the top"


@pytest.mark.parametrize("bad", ["a small red circle", "a small large red circle at the top", "a dog"])
def test_unparseable_prompt_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        parse_caption(bad)


def test_render_prompts_draws_what_each_prompt_names():
    imgs = render_prompts(["a large blue square at the left", "a large blue square at the right"], seed=0)
    left, right = imgs.astype(float)
    blue = lambda im: im[..., 2] - im[..., 0]  # noqa: E731
    assert blue(left)[:, :16].sum() > blue(left)[:, 16:].sum()
    assert blue(right)[:, 16:].sum() > blue(right)[:, :16].sum()


def test_word_tokenizer_gives_every_caption_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    write_word_tokenizer(tmp_path, vocabulary())
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for p in all_prompts():
        tokens = tok.convert_ids_to_tokens(tok(p).input_ids)
        assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in p.split()] + ["<|endoftext|>"]
