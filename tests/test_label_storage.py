"""Soft-label storage: dense fp16/fp32 and top-k sparsified logits."""

from __future__ import annotations

import pytest
import torch

from cvdd.artifacts.labels import index_dtype, pack_logits, payload_bytes, unpack_logits


def test_dense_storage_round_trips_at_its_precision():
    logits = torch.randn(7, 10) * 5
    assert torch.equal(unpack_logits(pack_logits(logits, "float32")), logits)
    half = pack_logits(logits, "float16")
    assert half["logits"].dtype == torch.float16 and payload_bytes(half) == 7 * 10 * 2
    assert torch.allclose(unpack_logits(half), logits, atol=1e-2)


def test_topk_keeps_the_largest_logits_and_fills_the_rest_with_their_mean():
    logits = torch.tensor([[5.0, -1.0, 2.0, 0.0, -3.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    packed = pack_logits(logits, "float32", topk=2)
    assert packed["indices"].dtype == torch.uint8
    dense = unpack_logits(packed)
    expected = torch.tensor([[5.0, -4 / 3, 2.0, -4 / 3, -4 / 3], [1.0, 1.0, 1.0, 3.0, 4.0]])
    assert torch.allclose(dense, expected)
    # the ranking of the kept classes and the argmax survive; the tail is flat
    assert torch.equal(dense.argmax(1), logits.argmax(1))
    # 2 fp32 values + 2 uint8 indices + 1 fp32 rest per image
    assert payload_bytes(packed) == 2 * (2 * 4 + 2 * 1 + 4)


def test_topk_at_least_the_class_count_is_dense_and_bad_settings_are_refused():
    logits = torch.randn(3, 4)
    assert "logits" in pack_logits(logits, "float16", topk=4)
    with pytest.raises(ValueError, match=r"relabel\.topk=0"):
        pack_logits(logits, "float16", topk=0)
    with pytest.raises(ValueError, match=r"relabel\.dtype='bfloat8'"):
        pack_logits(logits, "bfloat8")


def test_index_type_is_the_narrowest_that_fits():
    assert index_dtype(10) == torch.uint8 and index_dtype(256) == torch.uint8
    assert index_dtype(1000) == torch.int16 and index_dtype(40000) == torch.int32
    logits = torch.randn(2, 1000)
    packed = pack_logits(logits, "float16", topk=10)
    assert payload_bytes(packed) == 2 * (10 * 2 + 10 * 2 + 2)  # ImageNet-1K top-10: 42 bytes per image
    assert torch.equal(unpack_logits(packed).topk(10).indices.sort().values, logits.topk(10).indices.sort().values)
