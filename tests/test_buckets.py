"""sora.data buckets (Open-Sora v1.1 bucket.py / aspect.py) and the resumable samplers."""

import collections

import pytest

from sora.data import ASPECT_RATIOS, RESOLUTIONS, Bucket, StatefulDistributedSampler, VariableVideoBatchSampler

# ---- tables ------------------------------------------------------------------------------------


def test_resolution_pixels_and_aspect_tables():
    assert RESOLUTIONS == {"144p": 36864, "256": 65536, "240p": 102240, "360p": 230400, "512": 262144,
                           "480p": 409920, "720p": 921600, "1024": 1048576, "1080p": 2073600, "4k": 8294400}
    # spot checks against Open-Sora v1.1 aspect.py, including its hand-edited entries
    expected = {
        ("144p", "0.56"): (144, 256), ("144p", "0.38"): (117, 312), ("144p", "2.08"): (277, 132),
        ("240p", "0.56"): (240, 426), ("240p", "0.67"): (262, 393), ("240p", "1.00"): (320, 320),
        ("360p", "0.56"): (360, 640), ("480p", "0.48"): (444, 925), ("480p", "1.33"): (740, 555),
        ("720p", "0.56"): (720, 1280), ("720p", "2.00"): (1358, 680), ("1080p", "1.78"): (1920, 1080),
        ("4k", "0.56"): (2160, 3840), ("4k", "2.08"): (4156, 1994),
        ("256", "1.0"): (256, 256), ("256", "0.25"): (128, 512), ("512", "4.0"): (1024, 256),
        ("1024", "0.57"): (768, 1344), ("1024", "3.62"): (1856, 512),
    }
    for (name, key), size in expected.items():
        assert ASPECT_RATIOS[name][key] == size, (name, key)
    for name, table in ASPECT_RATIOS.items():
        assert len(table) == (40 if name in ("256", "512", "1024") else 17), name
        pixel_tolerance = 0.1 if name in ("256", "512", "1024") else 0.015  # PixArt's grid of 64 is coarser
        for key, (h, w) in table.items():  # every entry has about the resolution's pixels and its ratio
            assert abs(h * w / RESOLUTIONS[name] - 1) < pixel_tolerance, (name, key)
            assert abs(h / w - float(key)) < 0.02, (name, key)


# ---- bucket assignment -------------------------------------------------------------------------

CONFIG = {"240p": {16: (1.0, 4), 32: (1.0, 2)}, "144p": {16: (1.0, 8)}, "256": {1: (1.0, 64)}}


def test_largest_resolution_and_frame_count_first():
    bucket = Bucket(CONFIG)
    assert bucket.resolutions == ["240p", "256", "144p"]
    assert bucket.get_bucket_id(100, 240, 426) == ("240p", 32, "0.56")
    assert bucket.get_bucket_id(33, 240, 426) == ("240p", 32, "0.56")
    assert bucket.get_bucket_id(32, 240, 426) == ("240p", 16, "0.56")  # T > t * frame_interval, strictly
    assert bucket.get_bucket_id(17, 240, 426) == ("240p", 16, "0.56")
    assert bucket.get_bucket_id(16, 240, 426) is None  # too short for every video bucket
    assert bucket.get_bucket_id(40, 240, 426, frame_interval=2) == ("240p", 16, "0.56")
    assert bucket.get_bucket_id(65, 240, 426, frame_interval=2) == ("240p", 32, "0.56")
    assert bucket.get_bucket_id(100, 144, 256) == ("144p", 16, "0.56")  # too small for 240p
    assert bucket.get_bucket_id(100, 100, 100) is None  # too small for every resolution


def test_images_go_only_to_one_frame_buckets():
    bucket = Bucket(CONFIG)
    assert bucket.get_bucket_id(1, 1080, 1920) == ("256", 1, "0.57")  # 240p has no 1-frame bucket
    assert bucket.get_bucket_id(1, 256, 256) == ("256", 1, "1.0")
    assert bucket.get_bucket_id(1, 200, 200) is None  # 40,000 < 0.8 * 65,536
    assert Bucket({"240p": {16: (1.0, 4)}}).get_bucket_id(1, 1080, 1920) is None
    assert Bucket({"256": {1: (1.0, 64)}}).get_bucket_id(40, 256, 256) is None  # videos never fill an image bucket


def test_eighty_percent_pixel_rule_at_the_boundary():
    bucket = Bucket({"240p": {16: (1.0, 4)}})
    assert 128 * 639 == 0.8 * 102240
    assert bucket.get_bucket_id(20, 128, 639) == ("240p", 16, "0.38")
    assert bucket.get_bucket_id(20, 128, 638) is None


def test_aspect_ratio_is_the_closest_key():
    bucket = Bucket({"240p": {16: (1.0, 4)}})
    assert bucket.get_bucket_id(20, 480, 640) == ("240p", 16, "0.75")
    assert bucket.get_bucket_id(20, 1920, 1080) == ("240p", 16, "1.78")
    assert bucket.get_bucket_id(20, 700, 1000) == ("240p", 16, "0.67")  # 0.70: 0.67 is closer than 0.75
    assert bucket.get_bucket_id(20, 1000, 100) == ("240p", 16, "2.08")  # beyond the table: its end
    assert bucket.get_thw(("240p", 16, "0.75")) == (16, 276, 368)
    assert bucket.get_thw(("240p", 16, "1.78")) == (16, 426, 240)


def test_batch_sizes_probabilities_and_count():
    bucket = Bucket(CONFIG)
    assert bucket.get_batch_size(("240p", 32, "0.56")) == 2
    assert bucket.get_batch_size(("144p", 16, "1.00")) == 8
    assert bucket.get_prob(("256", 1, "1.0")) == 1.0
    assert len(bucket) == 2 * 17 + 17 + 40


def _keep_rate(keep_prob, draws=4000):
    bucket = Bucket({"240p": {16: (keep_prob, 4)}, "144p": {16: (1.0, 8)}})
    kept = [bucket.get_bucket_id(20, 240, 426, seed=(0, i // 100, i % 100)) for i in range(draws)]
    assert {b[0] for b in kept} <= {"240p", "144p"}
    return sum(b[0] == "240p" for b in kept) / draws


def test_keep_probability_and_fallback_to_the_next_resolution():
    assert _keep_rate(1.0) == 1.0
    assert _keep_rate(0.0) == 0.0  # never kept: every sample falls back to 144p
    assert abs(_keep_rate(0.3) - 0.3) < 0.03  # 4 standard deviations
    bucket = Bucket({"240p": {16: (0.5, 4)}, "144p": {16: (1.0, 8)}})
    first = [bucket.get_bucket_id(20, 240, 426, seed=(7, 0, i)) for i in range(50)]
    assert first == [bucket.get_bucket_id(20, 240, 426, seed=(7, 0, i)) for i in range(50)]  # seeded draws repeat
    assert first != [bucket.get_bucket_id(20, 240, 426, seed=(7, 1, i)) for i in range(50)]  # another epoch differs


def test_disabled_bucket_sends_samples_to_the_next_resolution():
    bucket = Bucket({"480p": {16: (1.0, 2), 32: (0.0, None)}, "240p": {32: (1.0, 4)}})
    # Open-Sora's rule: the largest fitting t (32) is disabled at 480p, so 480p is left, not its 16-frame bucket
    assert bucket.get_bucket_id(40, 480, 854) == ("240p", 32, "0.56")
    assert bucket.get_bucket_id(20, 480, 854) == ("480p", 16, "0.56")
    assert bucket.get_bucket_id(20, 240, 426) is None


def test_candidates_are_every_bucket_some_epoch_draws():
    """What sora.preprocess encodes: the buckets get_bucket_id gives over many epochs' draws, no more."""
    bucket = Bucket({"480p": {16: (0.5, 2), 32: (0.0, None)}, "240p": {16: (0.3, 4)}, "144p": {16: (1.0, 8)},
                     "1080p": {16: (1.0, 1)}})
    for T, H, W in [(40, 480, 854), (20, 480, 854), (20, 240, 426), (20, 144, 256), (8, 480, 854)]:
        drawn = {bucket.get_bucket_id(T, H, W, seed=(0, epoch, 3)) for epoch in range(200)} - {None}
        assert set(bucket.candidates(T, H, W)) == drawn, (T, H, W)
    assert bucket.candidates(20, 480, 854) == [("480p", 16, "0.56"), ("240p", 16, "0.56"), ("144p", 16, "0.56")]
    assert bucket.candidates(8, 480, 854) == []


@pytest.mark.parametrize(
    "config, named",
    [
        ({"250p": {16: (1.0, 4)}}, "'250p'"),
        ({"240p": {16: (1.5, 4)}}, "keep_prob"),
        ({"240p": {16: (-0.1, 4)}}, "keep_prob"),
        ({"240p": {16: (1.0, 0)}}, "batch_size"),
        ({"240p": {16: (0.5, None)}}, "batch_size"),
        ({"240p": {16: (1.0, 2.0)}}, "batch_size"),
        ({"240p": {"16": (1.0, 4)}}, "num_frames"),
        ({"240p": {16: (1.0,)}}, "pair"),
        ({"240p": [16, (1.0, 4)]}, "bucket_config['240p']"),
        ({"240p": {}}, "bucket_config['240p']"),
        ([("240p", {16: (1.0, 4)})], "non-empty dict"),
        ({}, "non-empty dict"),
    ],
)
def test_malformed_bucket_config(config, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("(", r"\(")) as error:
        Bucket(config)
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)  # one sentence


def test_disabled_bucket_needs_no_batch_size():
    assert Bucket({"240p": {16: (0.0, None), 32: (1, 2)}}).get_bucket_id(20, 240, 426) is None


# ---- VariableVideoBatchSampler -----------------------------------------------------------------


class FakeVariableDataset:
    """Only what the batch sampler reads: get_data_info and frame_interval."""

    frame_interval = 1

    def __init__(self, info):
        self.info = info

    def __len__(self):
        return len(self.info)

    def get_data_info(self, index):
        return self.info[index]


SAMPLER_CONFIG = {"240p": {32: (1.0, 4)}, "144p": {16: (1.0, 2)}, "256": {1: (1.0, 8)}}
# 10 videos for 240p x 32, 5 for 144p x 16, 3 images for 256 x 1, 2 too small for any bucket
INFO = [(40, 240, 426)] * 10 + [(20, 144, 256)] * 5 + [(1, 256, 256)] * 3 + [(20, 50, 50)] * 2
GROUPS = {(32, 240, 426): set(range(10)), (16, 144, 256): set(range(10, 15)), (1, 256, 256): {15, 16, 17}}


def batches(**kwargs):
    sampler = VariableVideoBatchSampler(FakeVariableDataset(INFO), SAMPLER_CONFIG, **kwargs)
    return list(sampler)


def _thw(batch):
    (thw,) = {key[1:] for key in batch}  # one bucket per batch
    return thw


def test_batches_per_bucket_padded():
    plan = batches(seed=1)
    sizes = collections.Counter((_thw(b), len(b)) for b in plan)
    assert sizes == {((32, 240, 426), 4): 3, ((16, 144, 256), 2): 3, ((1, 256, 256), 8): 1}
    for thw, samples in GROUPS.items():
        used = [key[0] for b in plan if _thw(b) == thw for key in b]
        assert set(used) == samples  # every sample of the bucket, padded only with its own samples
    assert not {18, 19} & {key[0] for b in plan for key in b}


def test_batches_per_bucket_dropped():
    plan = batches(seed=1, drop_last=True)
    sizes = collections.Counter((_thw(b), len(b)) for b in plan)
    assert sizes == {((32, 240, 426), 4): 2, ((16, 144, 256), 2): 2}  # 3 images < 8: no full batch
    used = [key[0] for b in plan for key in b]
    assert len(used) == len(set(used)) == 12


def test_order_is_deterministic_per_seed_and_epoch():
    dataset = FakeVariableDataset(INFO)
    sampler = VariableVideoBatchSampler(dataset, SAMPLER_CONFIG, seed=4)
    epoch0 = list(sampler)
    assert epoch0 == list(sampler) == batches(seed=4)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert {key[0] for b in epoch1 for key in b} == {key[0] for b in epoch0 for key in b} == set(range(18))
    assert batches(seed=5) != epoch0
    assert batches(seed=4, shuffle=False) == batches(seed=9, shuffle=False)  # unshuffled: no randomness


def test_ranks_get_disjoint_equal_shares():
    whole = batches(seed=2, drop_last=True)  # 4 batches
    shares = [batches(seed=2, drop_last=True, num_replicas=2, rank=r) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    assert {k for b in shares[0] for k in b}.isdisjoint({k for b in shares[1] for k in b})
    assert sorted(shares[0] + shares[1]) == sorted(whole)
    whole = batches(seed=2)  # 7 batches over 3 ranks: padded to 9 with the first two
    shares = [batches(seed=2, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    assert [shares[r][i] for i in range(3) for r in range(3)] == whole + whole[:2]


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    dataset = FakeVariableDataset(INFO)
    sampler = VariableVideoBatchSampler(dataset, SAMPLER_CONFIG, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(sampler) == 7 and sampler.index == 0  # a finished epoch starts over
    iterator = iter(sampler)
    seen = [next(iterator), next(iterator), next(iterator)]
    assert seen == full[:3]
    state = sampler.state_dict()
    assert state == {"seed": 3, "epoch": 2, "index": 3}
    assert sampler.state_dict(index=2)["index"] == 2  # the trainer's step count wins over prefetching
    resumed = VariableVideoBatchSampler(dataset, SAMPLER_CONFIG)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the same epoch keeps the resumed position
    assert len(resumed) == 4
    assert list(resumed) == full[3:]
    resumed.set_epoch(3)
    assert resumed.index == 0 and len(resumed) == 7


# ---- StatefulDistributedSampler ----------------------------------------------------------------


def test_stateful_sampler_shuffles_shares_and_resumes():
    dataset = list(range(10))
    whole = list(StatefulDistributedSampler(dataset, seed=1))
    assert sorted(whole) == dataset and whole != dataset
    assert list(StatefulDistributedSampler(dataset, shuffle=False)) == dataset
    other_epoch = StatefulDistributedSampler(dataset, seed=1)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != whole
    shares = [list(StatefulDistributedSampler(dataset, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]  # 10 padded to 12 with the first two
    assert [shares[r][i] for i in range(4) for r in range(3)] == whole + whole[:2]
    dropped = [list(StatefulDistributedSampler(dataset, num_replicas=3, rank=r, seed=1, drop_last=True)) for r in range(3)]
    assert [len(s) for s in dropped] == [3, 3, 3] and len(set(sum(dropped, []))) == 9
    sampler = StatefulDistributedSampler(dataset, num_replicas=3, rank=1, seed=1)
    iterator = iter(sampler)
    next(iterator)
    resumed = StatefulDistributedSampler(dataset, num_replicas=3, rank=1)
    resumed.load_state_dict(sampler.state_dict())
    assert sampler.state_dict() == {"seed": 1, "epoch": 0, "index": 1}
    assert list(resumed) == shares[1][1:]


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError, match="rank"):
        StatefulDistributedSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        VariableVideoBatchSampler(FakeVariableDataset(INFO), SAMPLER_CONFIG, num_replicas=0)
