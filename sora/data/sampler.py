"""Resumable, rank-disjoint samplers.

Both samplers build one epoch's plan from (seed, epoch) alone, give rank r every num_replicas-th entry
(padded by cycling, or truncated with drop_last, to an equal count per rank), and count what they have
yielded in `index`. `state_dict()` -> `{"seed", "epoch", "index"}`; after `load_state_dict` the same
epoch resumes at entry `index` of the same plan. A DataLoader prefetches, so the sampler's own count
runs ahead of the training step: pass the number of steps taken, `state_dict(index=steps)` (times the
batch size for the per-sample sampler). `set_epoch(e)` with a new epoch starts it from entry 0; the same
epoch keeps a resumed position. Iterating to the end resets `index` to 0.
"""

import torch

from .buckets import Bucket
from .datasets import seed_from


def _fit(entries, multiple, drop_last):
    """`entries` cut down to a multiple of `multiple` (drop_last), or padded up to one by cycling them."""
    remainder = len(entries) % multiple
    if remainder and drop_last:
        return entries[: len(entries) - remainder]
    if remainder:
        return entries + [entries[i % len(entries)] for i in range(multiple - remainder)]
    return entries


class _ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, num_replicas, rank, shuffle, seed, drop_last):
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0
        self._cached = (None, None)

    def _build(self):
        """The whole epoch's entries, before the split across ranks."""
        raise NotImplementedError

    def _generator(self):
        return torch.Generator().manual_seed(seed_from(self.seed, self.epoch))

    def _plan(self):
        """This rank's entries for the current (seed, epoch)."""
        key = (self.seed, self.epoch)
        if self._cached[0] != key:
            entries = _fit(self._build(), self.num_replicas, self.drop_last)
            self._cached = (key, entries[self.rank :: self.num_replicas])
        return self._cached[1]

    def __iter__(self):
        plan = self._plan()
        while self.index < len(plan):
            self.index += 1
            yield plan[self.index - 1]
        self.index = 0

    def __len__(self):
        """Entries left in this epoch on this rank."""
        return max(len(self._plan()) - self.index, 0)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch = epoch
            self.index = 0

    def state_dict(self, index=None):
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index if index is None else int(index)}

    def load_state_dict(self, state_dict):
        self.seed = int(state_dict["seed"])
        self.epoch = int(state_dict["epoch"])
        self.index = int(state_dict["index"])


class StatefulDistributedSampler(_ResumableSampler):
    """Sample indices for a fixed-size dataset: a seeded permutation per epoch (or 0..n-1 without shuffle).

    `index` counts samples consumed on this rank.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        super().__init__(num_replicas, rank, shuffle, seed, drop_last)
        self.dataset = dataset

    def _build(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self._generator()) if self.shuffle else torch.arange(n)
        return order.tolist()


class VariableVideoBatchSampler(_ResumableSampler):
    """Batches of `VariableVideoTextDataset` keys `(index, T, H, W)`, every batch from one bucket.

    Each epoch every sample is given a bucket (`Bucket.get_bucket_id` seeded by (seed, epoch, index);
    samples no bucket keeps are left out), each bucket's samples are shuffled and cut into batches of
    that bucket's batch size (the last partial batch padded by cycling the bucket's samples, or dropped
    with drop_last), and the batch order is shuffled. `index` counts batches consumed on this rank.
    The dataset must offer `get_data_info(i)` -> (T, H, W) and `frame_interval`.
    """

    def __init__(self, dataset, bucket_config, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False):
        super().__init__(num_replicas, rank, shuffle, seed, drop_last)
        self.dataset = dataset
        self.bucket = Bucket(bucket_config)
        self._groups = (None, None)

    def group_by_bucket(self):
        """{bucket_id: [sample indices]} for the current epoch, in sample order (worked out once per epoch:
        it visits every sample)."""
        key = (self.seed, self.epoch)
        if self._groups[0] != key:
            groups = {}
            for i in range(len(self.dataset)):
                T, H, W = self.dataset.get_data_info(i)
                bucket_id = self.bucket.get_bucket_id(T, H, W, self.dataset.frame_interval, seed=(self.seed, self.epoch, i))
                if bucket_id is not None:
                    groups.setdefault(bucket_id, []).append(i)
            self._groups = (key, groups)
        return self._groups[1]

    def _build(self):
        generator = self._generator()
        batches = []
        for bucket_id, samples in self.group_by_bucket().items():
            if self.shuffle:
                samples = [samples[i] for i in torch.randperm(len(samples), generator=generator).tolist()]
            batch_size = self.bucket.get_batch_size(bucket_id)
            samples = _fit(samples, batch_size, self.drop_last)
            T, H, W = self.bucket.get_thw(bucket_id)
            for start in range(0, len(samples), batch_size):
                batches.append([(i, T, H, W) for i in samples[start : start + batch_size]])
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self):
        for batch in super().__iter__():
            yield list(batch)
