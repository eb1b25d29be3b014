"""DH-PSI (Huberman et al. 1999) in RFC 3526's 2048-bit group: exact alignment, the
group's constants, and what crosses the wire."""

from __future__ import annotations

import random

import pytest

from fedloom.vertical.psi import (
    ELEMENT_BYTES,
    MODP_2048,
    PsiParty,
    align,
    hash_to_group,
)


def test_prime_is_rfc3526_group_14_and_safe() -> None:
    mpmath = pytest.importorskip("mpmath")
    sympy = pytest.importorskip("sympy")
    mpmath.mp.prec = 2300
    f = int(mpmath.floor(mpmath.mpf(2) ** 1918 * mpmath.pi))
    expected = 2**2048 - 2**1984 - 1 + 2**64 * (f + 124476)
    assert expected == MODP_2048
    assert sympy.isprime(MODP_2048) and sympy.isprime((MODP_2048 - 1) // 2)
    assert ELEMENT_BYTES == 256


def test_hash_lands_in_the_prime_order_subgroup_and_blinding_commutes() -> None:
    q = (MODP_2048 - 1) // 2
    h = hash_to_group("record-17")
    assert h != hash_to_group("record-18")
    assert pow(h, q, MODP_2048) == 1  # a quadratic residue: order divides q
    a, b = PsiParty(["x"]), PsiParty(["y"])
    assert b.blind_theirs(a.blind_own(["z"])) == a.blind_theirs(b.blind_own(["z"]))


def test_hand_checkable_three_party_case() -> None:
    label = ["alice", "bob", "carol", "dave"]
    f1 = ["erin", "carol", "alice", "frank"]
    f2 = ["alice", "carol", "bob"]
    common, positions, report = align([PsiParty(label), PsiParty(f1), PsiParty(f2)])
    assert common == ["alice", "carol"]  # in the label party's order
    assert positions == [[0, 2], [2, 1], [0, 1]]
    assert report.intersection_size == 2
    assert report.set_sizes == [4, 4, 3]
    # label↔f1: 4 + 4 + 4 elements; label↔f2 on the 2 left: 2 + 2 + 3; then 2 row
    # indices to each follower.
    assert report.bytes_exchanged == 256 * (12 + 7) + 4 * 2 * 2
    assert report.messages == 8


def test_shuffled_partially_overlapping_lists_align_exactly() -> None:
    rng = random.Random(3)
    universe = [f"customer-{i:04d}" for i in range(120)]
    sets = [rng.sample(universe, k) for k in (70, 80, 60)]  # each shuffled
    common, positions, _ = align([PsiParty(s) for s in sets])
    expected = set(sets[0]) & set(sets[1]) & set(sets[2])
    assert set(common) == expected and len(common) == len(expected)
    for ids, rows in zip(sets, positions, strict=True):
        assert [ids[r] for r in rows] == common  # every party's rows in the same order


def test_disjoint_sets_and_bad_input() -> None:
    common, positions, report = align([PsiParty(["a", "b"]), PsiParty(["c"])])
    assert common == [] and positions == [[], []] and report.intersection_size == 0
    with pytest.raises(ValueError, match="duplicates"):
        PsiParty(["a", "a"])
    with pytest.raises(ValueError, match="outside the group"):
        PsiParty(["a"]).blind_theirs([0])
    with pytest.raises(ValueError, match="two parties"):
        align([PsiParty(["a"])])


def test_psi_alignment_equals_the_plain_join_on_a_vertical_data_set() -> None:
    from fedloom.vertical.data import build_vertical_dataset, join_by_plain_ids
    from fedloom.vertical.runner import aligned_parties

    data = build_vertical_dataset("breast_cancer", parties=2, coverage=0.8, seed=4, records=40)
    y, xs, report = aligned_parties(data)
    y_ref, xs_ref = join_by_plain_ids(data)
    assert report["intersection_size"] == len(y_ref)
    assert (y == y_ref).all()
    for x, ref in zip(xs, xs_ref, strict=True):
        assert (x == ref).all()
