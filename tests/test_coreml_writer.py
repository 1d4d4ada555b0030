"""The Core ML writer's own arithmetic: prefill blocks that tile the context, active time as a union of
intervals."""

from __future__ import annotations

import pytest

from siliconvert.convert.coreml.writer import active_seconds, prefill_block


def test_prefill_blocks_tile_the_context():
    assert [prefill_block(c) for c in (512, 128, 96, 100)] == [64, 64, 32, 4]


def test_active_seconds_is_the_union_of_intervals():
    assert active_seconds([]) == 0
    assert active_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == pytest.approx(4)
