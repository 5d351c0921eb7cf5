import json

import pytest
import torch

from hessq._errors import ConfigError, InputDataError
from hessq.data import DetectionBatches, coco_evaluate, detection_set, encode_targets, photo_crops


@pytest.fixture(scope="module")
def small_set():
    return detection_set("val", 12, seed=3, keep_masks=True)


def test_same_seed_gives_identical_canvases_and_json(small_set):
    again = detection_set("val", 12, seed=3)
    assert torch.equal(small_set.images, again.images)
    assert json.dumps(small_set.coco(), sort_keys=True) == json.dumps(again.coco(), sort_keys=True)
    other = detection_set("val", 12, seed=4)
    assert not torch.equal(small_set.images, other.images)
    assert small_set.coco()["annotations"] != other.coco()["annotations"]


def test_boxes_are_the_tight_boxes_of_the_pasted_masks(small_set):
    background = photo_crops(12, size=128, seed=3 * 3 + 1, scale=(0.05, 0.6))  # the val split's crops (stream 1)
    assert small_set.num_objects >= 12
    for image, bg, boxes, areas, masks in zip(small_set.images, background, small_set.boxes, small_set.areas,
                                              small_set.meta["masks"]):
        assert len(boxes) == len(masks) >= 1
        for (x, y, w, h), area, mask in zip(boxes.tolist(), areas.tolist(), masks):
            rows = torch.nonzero(mask.any(1)).flatten()
            cols = torch.nonzero(mask.any(0)).flatten()
            assert [x, y, w, h] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
            assert area == int(mask.sum()) and 14 * 14 // 8 <= area
        # pixels outside every mask are the background crop's, untouched; the last-pasted object is all visible
        changed = (image != bg).any(0)
        assert not (changed & ~masks.any(0)).any()
        assert changed[masks[-1]].float().mean() > 0.9


def test_coco_json_fields(small_set):
    coco = small_set.coco()
    assert len(coco["images"]) == 12 and len(coco["categories"]) == 10
    assert {a["category_id"] for a in coco["annotations"]} <= set(range(1, 11))
    first = coco["annotations"][0]
    assert set(first) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} and first["iscrowd"] == 0
    assert first["bbox"] == small_set.boxes[0][0].tolist()


def test_ground_truth_as_predictions_scores_ap_one_and_damage_lowers_it():
    data = detection_set("test", 20, seed=1)
    coco = data.coco()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco["annotations"]]
    scores = coco_evaluate(coco, perfect)
    assert scores["AP"] == 1.0 and scores["AP50"] == 1.0
    # a box shifted by half its width has IoU 1/3: wrong at every threshold
    shifted = [dict(p, bbox=[p["bbox"][0] + p["bbox"][2] / 2, *p["bbox"][1:]]) if i % 2 else p
               for i, p in enumerate(perfect)]
    damaged = coco_evaluate(coco, shifted)
    assert damaged["AP50"] < 0.75 and damaged["AP"] < 0.75
    wrong_class = [dict(p, category_id=p["category_id"] % 10 + 1) for p in perfect]
    assert coco_evaluate(coco, wrong_class)["AP"] == 0.0
    assert coco_evaluate(coco, [])["AP"] == 0.0
    with pytest.raises(InputDataError, match="image ids"):
        coco_evaluate(coco, [dict(perfect[0], image_id=999)])


def test_targets_peak_at_each_centre_and_batches_flip_consistently():
    data = detection_set("test", 6, seed=2)
    targets = encode_targets(data.boxes, data.labels)
    assert targets.shape == (6, 15, 32, 32)
    for n, (boxes, labels) in enumerate(zip(data.boxes, data.labels)):
        for (x, y, w, h), c in zip(boxes.tolist(), labels.tolist()):
            px, py = int((x + w / 2) / 4), int((y + h / 2) / 4)
            assert targets[n, c, py, px] == 1.0 and targets[n, 14, py, px] == 1.0
    assert int(targets[:, 14].sum()) <= data.num_objects
    assert targets[:, :10].max() == 1.0 and targets[:, :10].min() == 0.0
    flipped_x, flipped_t = next(iter(DetectionBatches(data, 6, flip=True, seed=5)))
    plain_x, plain_t = next(iter(DetectionBatches(data, 6)))
    for n in range(6):
        mirrored = not torch.equal(flipped_x[n], plain_x[n])
        if mirrored:  # the mirrored image's heatmap is the mirrored heatmap (centre cells shift by the parity only)
            assert torch.equal(flipped_x[n], plain_x[n].flip(-1))
            assert flipped_t[n, 14].sum() == plain_t[n, 14].sum()
        else:
            assert torch.equal(flipped_t[n], plain_t[n])


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="'train', 'val' or 'test'"):
        detection_set("validation", 2)
    with pytest.raises(ConfigError, match="max_size"):
        detection_set("val", 2, size=32, max_size=80)
    with pytest.raises(ConfigError, match="num_images"):
        detection_set("val", 0)
