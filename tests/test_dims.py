"""The dim algebra on its own: products, concatenations, conflicts, index maps."""

import numpy as np

from fxprune.dims import DimSolver


def test_unify_merges_and_keeps_size():
    s = DimSolver()
    a, b = s.new(8), s.new(None)
    s.unify(a, b)
    assert s.find(a) == s.find(b)
    assert s.size_of(b) == 8


def test_unify_of_different_sizes_pins_both():
    s = DimSolver()
    a, b = s.new(8), s.new(6)
    s.unify(a, b)
    assert s.find(a) in s.pins and s.find(b) in s.pins


def test_product_refines_to_common_atoms():
    # q heads seen as 9 x 64 (view) and as (3 kv x 3 per kv) x 64 (GQA expand + reshape)
    s = DimSolver()
    q, h, d = s.new(576), s.new(9), s.new(64)
    s.define_prod(q, [h, d])
    q2, kv, e, d2 = s.new(576), s.new(3), s.new(3), s.new(64)
    s.define_prod(q2, [kv, e, d2])
    s.unify(q, q2)
    assert [s.size_of(a) for a in s.atoms_of(q)] == [3, 3, 64]
    assert s.find(d) == s.find(d2)
    coords = s.coords(q)
    kv_root = s.find(kv)
    # element 64*3 is the first channel of the second kv head's first query head
    assert coords[kv_root][64 * 3] == 1 and coords[kv_root][64 * 3 - 1] == 0


def test_cat_coords_and_offsets():
    s = DimSolver()
    fused, q, k = s.new(10), s.new(6), s.new(4)
    s.define_cat(fused, [q, k])
    coords = s.coords(fused)
    assert np.array_equal(coords[s.find(q)], np.r_[np.arange(6), -np.ones(4, dtype=int)])
    assert np.array_equal(coords[s.find(k)][6:], np.arange(4))


def test_product_vs_cat_conflict_pins():
    s = DimSolver()
    v, a, b = s.new(8), s.new(2), s.new(4)
    s.define_prod(v, [a, b])
    c, d = s.new(4), s.new(4)
    s.define_cat(v, [c, d])
    assert s.pinned_atoms()  # conflicting views of one dim: nothing there may be pruned


def test_rotate_half_is_detected():
    s = DimSolver()
    d, half = s.new(8), s.new(4)
    s.define_cat(d, [half, half])
    assert s.halves_atoms(d) == {s.find(half)}
