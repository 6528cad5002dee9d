"""Batch-level assembly (ShardDataset(batch_size=B) == collate_vla of the items), the OpenVLA collator
contract, and augment="openvla" (determinism, documented ranges, geometry re-derived here)."""

import colorsys
import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from vlaprep import loader
from vlaprep.loader import ShardDataset, collate_vla, openvla_augment, openvla_augment_params

_spec = importlib.util.spec_from_file_location("loader_test_module", pathlib.Path(__file__).with_name("test_loader.py"))
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)


def assert_same(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("kw", [dict(history=1), dict(history=3, pixel_dtype="uint8"), dict(decode_images=False, history=2),
                                dict(mixture={"toy": 1.0}, history=2), dict(columns=["input_ids", "labels", "action"])],
                         ids=["h1", "h3-uint8", "png", "mixture", "columns"])
def test_dataset_batches_equal_collate_of_its_items(tmp_path, kw):
    tl.write_shards(tmp_path, tl.FEW_FILES, row_group_size=3)
    items = list(ShardDataset(tmp_path, seed=3, shuffle_buffer=5, **kw))
    batches = list(ShardDataset(tmp_path, seed=3, shuffle_buffer=5, batch_size=4, pad_token_id=7, **kw))
    assert len(batches) == math.ceil(len(items) / 4)
    for j, batch in enumerate(batches):
        assert_same(collate_vla(items[4 * j: 4 * j + 4], pad_token_id=7), batch)
    dropped = list(ShardDataset(tmp_path, seed=3, shuffle_buffer=5, batch_size=4, drop_last=True, **kw))
    assert len(dropped) == len(items) // 4


def test_collate_is_a_drop_in_for_openvlas_padded_collator(tmp_path):
    """OpenVLA: pad_sequence(right, pad_token_id) for input_ids, -100 for labels, attention_mask =
    input_ids != pad, stacked pixel_values, dataset_names."""
    tl.write_shards(tmp_path, tl.FEW_FILES)
    items = list(ShardDataset(tmp_path, shuffle=False))[:5]
    pad = 31999  # not a prompt token of these rows
    out = collate_vla(items, pad_token_id=pad)
    assert {"pixel_values", "input_ids", "attention_mask", "labels", "dataset_names"} <= set(out)
    ids = pad_sequence([i["input_ids"] for i in items], batch_first=True, padding_value=pad)
    labels = pad_sequence([i["labels"] for i in items], batch_first=True, padding_value=-100)
    assert torch.equal(out["input_ids"], ids) and torch.equal(out["labels"], labels)
    assert torch.equal(out["attention_mask"].bool(), ids.ne(pad))
    assert torch.equal(out["pixel_values"], torch.stack([i["pixel_values"] for i in items]))
    assert out["dataset_names"] == [i["dataset_name"] for i in items]


# --------------------------------------------------------------------------------------------------
# augment="openvla"


def test_augmentation_is_off_by_default_and_deterministic_per_seed_epoch_row(tmp_path):
    tl.write_shards(tmp_path, tl.FEW_FILES)
    plain = list(ShardDataset(tmp_path, shuffle=False, pixel_dtype="uint8"))
    for item in plain:
        tl.check_item({**item, "pixel_values": item["pixel_values"].float() / 255,
                       "wrist_pixel_values": item["wrist_pixel_values"].float() / 255}, history=1)

    def pixels(**kw):
        return {(i["episode_id"], i["step_index"]): i["pixel_values"]
                for i in ShardDataset(tmp_path, augment="openvla", pixel_dtype="uint8", **kw)}

    a = pixels(shuffle=False)
    assert a.keys() == {(i["episode_id"], i["step_index"]) for i in plain}
    # Same (seed, epoch, row) -> same pixels, whatever the order or batching the rows came in.
    b = pixels(shuffle=True, seed=0, shuffle_buffer=4, batch_size=None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = pixels(shuffle=False, epoch=1)
    d = pixels(shuffle=False, seed=1)
    assert sum(not torch.equal(a[k], c[k]) for k in a) > len(a) // 2
    assert sum(not torch.equal(a[k], d[k]) for k in a) > len(a) // 2
    assert sum(not torch.equal(a[k], p["pixel_values"]) for k, p in zip(a, plain)) > len(a) // 2


def test_augmented_colours_follow_openvlas_ops_in_order(tmp_path):
    """Uniform frames: the crop keeps them uniform and contrast (around the channel mean) keeps them as
    they are; brightness, saturation and hue are re-applied here with colorsys, in OpenVLA's order."""
    tl.write_shards(tmp_path, tl.FEW_FILES)
    items = list(ShardDataset(tmp_path, shuffle=False, augment="openvla", pixel_dtype="uint8", seed=4))
    keys = [(i["dataset_name"], i["episode_id"], i["step_index"], 0) for i in items]
    params = openvla_augment_params(keys, 4, 0)
    side = math.sqrt(0.9)
    assert np.allclose(params["h"], side) and np.allclose(params["w"], side)
    assert ((params["y0"] >= 0) & (params["y0"] <= 1 - side)).all() and ((params["x0"] >= 0) & (params["x0"] <= 1 - side)).all()
    assert (np.abs(params["brightness"]) <= 0.2).all() and (np.abs(params["hue"]) <= 0.05).all()
    for name in ("contrast", "saturation"):
        assert ((params[name] >= 0.8) & (params[name] <= 1.2)).all()
    assert params["brightness"].std() > 0.05  # spread over the range, not constant
    for j, item in enumerate(items):
        ep, t = int(item["episode_id"][2:]), int(item["step_index"])
        rgb = [ep / 255, t / 255, tl.PRIMARY / 255]
        rgb = [min(max(x + params["brightness"][j], 0), 1) for x in rgb]
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        rgb = [min(max(x, 0), 1) for x in colorsys.hsv_to_rgb(h, min(max(s * params["saturation"][j], 0), 1), v)]
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        rgb = [min(max(x, 0), 1) for x in colorsys.hsv_to_rgb((h + params["hue"][j]) % 1.0, s, v)]
        expected = [min(255, math.floor(x * 255.5)) for x in rgb]
        got = item["pixel_values"]
        assert torch.equal(got, got[:, :1, :1].expand_as(got)), "a uniform frame stays uniform"
        assert np.abs(np.array(got[:, 0, 0].tolist()) - expected).max() <= 1, (j, got[:, 0, 0].tolist(), expected)


def test_crop_resizes_the_box_bilinearly_like_tf_crop_and_resize():
    size = 16
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    img = np.stack([xx * 15, yy * 15, (xx + yy) * 7], 0).astype(np.uint8)  # [3, S, S]
    params = {"y0": np.array([0.03]), "x0": np.array([0.02]), "h": np.array([0.9]), "w": np.array([0.95]),
              "brightness": np.zeros(1), "contrast": np.ones(1), "saturation": np.ones(1), "hue": np.zeros(1)}
    out = openvla_augment(torch.from_numpy(img)[None], params)[0].numpy().astype(float)
    # TF crop_and_resize: output pixel (i, j) samples the input at y = (y0 + i * h / (S-1)) * (S-1), bilinear.
    src = img.astype(float) / 255
    for i in (0, 5, 15):
        for j in (0, 7, 15):
            y = (0.03 + i * 0.9 / (size - 1)) * (size - 1)
            x = (0.02 + j * 0.95 / (size - 1)) * (size - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, size - 1), min(x0 + 1, size - 1)
            fy, fx = y - y0, x - x0
            v = (src[:, y0, x0] * (1 - fy) * (1 - fx) + src[:, y0, x1] * (1 - fy) * fx
                 + src[:, y1, x0] * fy * (1 - fx) + src[:, y1, x1] * fy * fx)
            assert np.abs(out[:, i, j] - np.floor(v * 255.5)).max() <= 1, (i, j)


def test_augment_argument_checks(tmp_path):
    tl.write_shards(tmp_path, tl.FEW_FILES)
    with pytest.raises(ValueError, match="augment None or 'openvla'"):
        ShardDataset(tmp_path, augment="randaug")
    with pytest.raises(ValueError, match="decode_images=True with augment"):
        ShardDataset(tmp_path, augment="openvla", decode_images=False)
    assert loader.OPENVLA_AUGMENT["augment_order"][0] == "random_resized_crop"
