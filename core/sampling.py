"""The one seeded sampler: which images each training step sees, on every process, after any interruption.

Epoch e visits the images in the order `epoch_order(n, seed, e)`, cut into global batches; step s of
training is batch s of that sequence. Each process takes its near-equal part of each global batch
(`tensor_split`), optionally cut again into micro-batches for gradient accumulation. The items are
(epoch, index) keys, and `SeededSamples` draws each image's random augmentation from a generator seeded
by (seed, epoch, index). So a run on one process, on N processes, or resumed at any step trains on the
same global batches with the same augmentations.
"""
import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of an epoch; depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class SeededBatches(torch.utils.data.Sampler):
    """Lists of (epoch, index) keys for training steps start..stop-1 (stop None: endless), this process's part.

    drop_last: an epoch has n // batch steps (pretraining, detection) instead of ceil(n / batch) (probes,
    whose last batch is smaller). A batch too small to give every process and micro-batch an image is
    skipped, on every process alike."""

    def __init__(self, n, batch, seed, start=0, stop=None, rank=0, world=1, micro=1, drop_last=True):
        if n < 1 or batch < 1:
            raise ValueError("SeededBatches needs images and a positive batch size")
        self.n, self.batch, self.seed, self.start, self.stop = n, batch, seed, start, stop
        self.rank, self.world, self.micro = rank, world, micro
        sizes = [batch] * (n // batch) + ([] if drop_last or n % batch == 0 else [n % batch])
        self.sizes = [s for s in sizes if s >= world * micro]
        if not self.sizes:
            raise ValueError(f"{n} images make no batch of {batch} for {world} processes")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sizes)

    def __len__(self):
        if self.stop is None:
            raise TypeError("an endless SeededBatches has no length")
        return (self.stop - self.start) * self.micro

    def __iter__(self):
        step, order, order_epoch = self.start, None, -1
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        while self.stop is None or step < self.stop:
            epoch, pos = divmod(step, len(self.sizes))
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch), epoch
            mine = order[offsets[pos]:offsets[pos + 1]].tensor_split(self.world)[self.rank]
            for part in mine.tensor_split(self.micro):
                yield [(epoch, int(i)) for i in part]
            step += 1


class SeededSamples(torch.utils.data.Dataset):
    """dataset[index] under a global RNG seeded by (seed, epoch, index): the same crops, flips and other
    random transforms whatever the process count, the loader workers or an interruption."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_000_007 + i) % (2 ** 63))
            return self.dataset[i]
