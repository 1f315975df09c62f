"""Id encoding for the baselines: training vocabularies, OOV, right padding, categories."""

import torch

from gcnee.baselines.data import OOV, PAD, EncodedSplit, FeatureEncoder, collate_batch
from gcnee.data.tables import Items, Sample


def sample(sid, user, item, hist, ratings, label=1):
    return Sample(sample_id=sid, user=user, item=item, title=item, rating=4.0, label=label,
                  timestamp=sid, history_items=list(hist), history_titles=list(hist),
                  history_ratings=list(ratings))


TRAIN = [sample(0, "u1", "a", ["b", "c"], [5.0, 3.0]),
         sample(1, "u2", "b", ["a", "c", "d"], [4.0, 4.0, 1.0], label=0)]
ITEMS = Items({i: i for i in "abcdz"}, {"a": {"class": ["Drama", "War"]}, "b": {"class": ["War"]},
                                         "c": {"year": "1990"}})


def test_vocabularies_come_from_train_and_unknown_ids_are_oov():
    enc = FeatureEncoder.fit(TRAIN, ITEMS)
    assert enc.sizes() == {"n_users": 4, "n_items": 6, "n_ratings": 6, "max_history": 3}
    test = [sample(9, "u3", "z", ["a", "z"], [2.5, 5.0]), sample(8, "u1", "d", [], [])]
    t = enc.encode(test)
    assert t["user"].tolist() == [OOV, enc.users["u1"]]
    assert t["item"].tolist() == [OOV, enc.items["d"]]
    assert t["hist_items"].tolist() == [[enc.items["a"], OOV], [PAD, PAD]]
    assert t["hist_ratings"].tolist() == [[OOV, enc.ratings[5.0]], [PAD, PAD]]
    assert t["hist_mask"].tolist() == [[True, True], [False, False]]
    assert t["sample_id"].tolist() == [9, 8] and t["label"].dtype == torch.float32
    assert enc.oov_rates(test) == {"users": 0.5, "items": 0.5, "history_items": 0.5}


def test_most_recent_history_kept_right_padded_and_widened():
    enc = FeatureEncoder.fit(TRAIN[:1], ITEMS)  # max_history 2
    t = enc.encode([sample(3, "u1", "a", ["a", "b", "c"], [5.0, 5.0, 3.0])], width=4)
    assert t["hist_items"].tolist() == [[enc.items["b"], enc.items["c"], PAD, PAD]]
    assert t["hist_mask"].tolist() == [[True, True, False, False]]


def test_categories_multi_hot_from_items_extra():
    enc = FeatureEncoder.fit(TRAIN, ITEMS)
    assert enc.categories == ["Drama", "War"]
    g = enc.genre_tensor()
    assert g.shape == (6, 2)
    assert g[enc.items["a"]].tolist() == [1.0, 1.0] and g[enc.items["b"]].tolist() == [0.0, 1.0]
    assert g[enc.items["c"]].sum() == 0 and g[PAD].sum() == 0 and g[OOV].sum() == 0
    assert FeatureEncoder.fit(TRAIN, Items({"a": "a"})).genre_tensor() is None


def test_dataloader_batches_slice_all_tensors():
    enc = FeatureEncoder.fit(TRAIN, ITEMS)
    ds = EncodedSplit(enc.encode(TRAIN))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_batch)
    batch = next(iter(loader))
    assert batch["hist_items"].shape == (2, 3) and batch["label"].tolist() == [1.0, 0.0]
    assert ds[1]["user"].item() == enc.users["u2"]
