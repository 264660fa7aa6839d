"""PinnedSlabs: host buffers carved from power-of-two slabs, without the caching host
allocator's rounding of each one ([Note: pinned slabs])."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded.pinned import ALIGN, PinnedSlabs

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int8]


@settings(max_examples=30, deadline=None)
@given(requests=st.lists(st.tuples(st.lists(st.integers(0, 40), min_size=0, max_size=3), st.sampled_from(DTYPES)), min_size=1, max_size=12),
       slab_kib=st.sampled_from([1, 4, 64]))
def test_views_are_disjoint_aligned_and_the_slabs_hold_little_more_than_asked(requests, slab_kib):
    slabs = PinnedSlabs(pin=False, slab_bytes=slab_kib * 1024)
    views = [(slabs.empty(tuple(shape), dtype), dtype) for shape, dtype in requests]
    spans = []
    for (shape, dtype), (v, _) in zip(requests, views):
        assert v.shape == tuple(shape) and v.dtype == dtype and v.is_contiguous()
        if v.numel():
            assert v.data_ptr() % ALIGN == 0
            spans.append((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two views share a byte
    for i, (v, dtype) in enumerate(views):  # each holds what is written to it
        v.fill_(i % 100 if not dtype.is_floating_point else i + 0.5) if v.numel() else None
    for i, (v, dtype) in enumerate(views):
        if v.numel():
            assert (v == (i % 100 if not dtype.is_floating_point else i + 0.5)).all()
    asked = sum(-(-n // ALIGN) * ALIGN for n in (e - s for s, e in spans))
    largest = max((e - s for s, e in spans), default=0)
    # first fit: every slab but the last is at least half full, unless one request filled a slab of its own
    assert slabs.nbytes <= 2 * asked + max(slab_kib * 1024, 2 * largest)


def test_a_request_larger_than_a_slab_gets_the_next_power_of_two_and_later_ones_share_it():
    slabs = PinnedSlabs(pin=False, slab_bytes=4096)
    big = slabs.empty((3000,), torch.float32)  # 12000 bytes -> a 16 KiB slab
    small = slabs.empty((100,), torch.float32)  # fits beside it
    assert slabs.nbytes == 16384 and big.untyped_storage().data_ptr() == small.untyped_storage().data_ptr()
    assert slabs.copy(torch.arange(5.0)).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
