"""The one seeded sampler and seeded per-image randomness (core.sampling), used by pretraining, the SGD
probes and the torchvision detection engine."""
import torch

from core.sampling import SeededBatches, SeededSamples, epoch_order


def flat(batches):
    return [key for b in batches for key in b]


def test_processes_take_their_part_of_every_global_batch():
    one = list(SeededBatches(23, 8, seed=1, start=6, stop=9, drop_last=False))
    parts = [list(SeededBatches(23, 8, seed=1, start=6, stop=9, rank=r, world=3, drop_last=False)) for r in range(3)]
    assert [len(b) for b in one] == [8, 8, 7]  # steps 6-8 are epoch 2 (3 steps an epoch, the last one short)
    for step, batch in enumerate(one):  # the processes' parts, in rank order, are the one-process batch
        assert sum((p[step] for p in parts), []) == batch
    assert sorted(i for _, i in flat(one)) == list(range(23)) and {e for e, _ in flat(one)} == {2}
    assert [i for _, i in flat(one)] == epoch_order(23, 1, 2).tolist()


def test_epochs_resume_and_micro_batches():
    full = list(SeededBatches(20, 4, seed=0, start=0, stop=12))  # drop_last: 5 steps an epoch
    assert list(SeededBatches(20, 4, seed=0, start=7, stop=12)) == full[7:]  # a resumed run continues the sequence
    assert full[:5] != full[5:10] and sorted(i for _, i in flat(full[5:10])) == list(range(20))  # new order, epoch 1
    micro = list(SeededBatches(20, 4, seed=0, start=0, stop=12, micro=2))
    assert [a + b for a, b in zip(micro[::2], micro[1::2])] == full
    assert len(SeededBatches(20, 4, seed=0, start=3, stop=12, micro=2)) == 18
    endless = iter(SeededBatches(20, 4, seed=0, start=0))
    assert [next(endless) for _ in range(12)] == full
    # a last batch too small for every process is skipped alike on all of them
    assert [len(b) for b in SeededBatches(17, 8, seed=0, start=0, stop=2, world=2, drop_last=False)] == [4, 4]


def test_augmentation_depends_on_seed_epoch_and_image_only():
    class Draw:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3), i

    s = SeededSamples(Draw(), seed=0)
    a = s[(2, 3)][0]
    torch.rand(100)  # the global generator's state does not matter ...
    assert torch.equal(s[(2, 3)][0], a)
    assert not torch.equal(s[(3, 3)][0], a) and not torch.equal(s[(2, 4)][0], a)  # ... epoch and image do
    state = torch.get_rng_state()
    s[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator is left as it was
