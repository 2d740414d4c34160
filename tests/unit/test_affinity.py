"""worker_cpu_affinity: nginx's mask syntax and which CPU each worker gets."""

import pytest

from mailproxy.affinity import CpuAffinity, cpus_for, mismatch_warning, parse_mask


def test_mask_rightmost_character_is_cpu_0():
    assert parse_mask("0001") == {0}
    assert parse_mask("1010") == {1, 3}
    assert parse_mask("10 01") == {0, 3}        # spaces skipped, as ngx_set_cpu_affinity


def test_mask_bad_character():
    with pytest.raises(ValueError, match='invalid character "2"'):
        parse_mask("0102")


def test_off_binds_nothing():
    assert cpus_for(None, 0, [0, 1]) is None


def test_auto_one_cpu_per_worker_cycling():
    aff = CpuAffinity(True, ())
    assert [cpus_for(aff, n, [0, 1, 2]) for n in range(4)] == [{0}, {1}, {2}, {0}]


def test_auto_counts_only_usable_cpus():
    # a container allowed CPUs 2 and 3: worker 0 gets CPU 2, never a refused CPU 0
    aff = CpuAffinity(True, ())
    assert cpus_for(aff, 0, [3, 2]) == {2}
    assert cpus_for(aff, 1, [2, 3]) == {3}


def test_auto_with_a_mask():
    aff = CpuAffinity(True, (frozenset({1, 3}),))
    assert [cpus_for(aff, n, range(4)) for n in range(3)] == [{1}, {3}, {1}]
    assert cpus_for(aff, 0, [0, 2]) is None     # nothing usable: no binding


def test_masks_per_worker_last_repeats():
    aff = CpuAffinity(False, (frozenset({0}), frozenset({1, 2})))
    assert [cpus_for(aff, n, range(4)) for n in range(3)] == [{0}, {1, 2}, {1, 2}]


def test_mismatch_warning_as_nginx():
    two = CpuAffinity(False, (frozenset({0}), frozenset({1})))
    assert mismatch_warning(two, 3).startswith('the number of "worker_processes" is not equal')
    assert mismatch_warning(two, 2) is None
    assert mismatch_warning(CpuAffinity(False, (frozenset({0}),)), 4) is None
    assert mismatch_warning(CpuAffinity(True, ()), 4) is None
    assert mismatch_warning(None, 4) is None
