"""csqc.call_choice: trials of blocks on every setting, and the margins a setting must beat."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csqc.call_choice import (MEMORY_MARGIN, THREAD_MARGIN, TRIAL_BLOCK_CALLS, TRIAL_BLOCKS, CallChoice,
                              CallSetting)

CAP, POOL = CallSetting(1), CallSetting(None)
CAP_PRIVATE, POOL_PRIVATE = CallSetting(1, False), CallSetting(None, False)


def _trial(choice: CallChoice, median_us: dict) -> list[CallSetting]:
    """Run one trial whose calls take ``median_us[setting]``, except the first of each block
    (after another setting), which takes a second and must not count. The settings called."""
    called = []
    while True:
        setting, timed = choice.next_call()
        assert timed
        called.append(setting)
        first_of_block = len(called) % TRIAL_BLOCK_CALLS == 1
        trials = choice.trials
        choice.record(1.0 if first_of_block else median_us[setting] * 1e-6)
        if choice.trials > trials:
            return called


def test_a_trial_runs_blocks_on_every_setting_in_turn_then_calls_go_untimed():
    choice = CallChoice([CAP, POOL, CAP_PRIVATE, POOL_PRIVATE], pool=2)
    called = _trial(choice, {CAP: 100, POOL: 100, CAP_PRIVATE: 100, POOL_PRIVATE: 100})
    round_ = [s for s in choice.settings for _ in range(TRIAL_BLOCK_CALLS)]
    assert called == round_ * TRIAL_BLOCKS and len(called) == choice.trial_calls
    assert choice.chosen == CAP  # a tie keeps the compiled setting
    assert choice.next_call() == (CAP, False)  # untimed until the next trial is due


@pytest.mark.parametrize("pool_us, expected", [(80, POOL), (89, POOL), (95, CAP), (150, CAP)])
def test_the_pool_replaces_the_cap_only_where_its_median_call_is_ten_percent_faster(pool_us, expected):
    choice = CallChoice([CAP, POOL], pool=2)
    _trial(choice, {CAP: 100, POOL: pool_us})
    assert choice.chosen == expected, choice.summary()
    assert f"2 threads, shared memory {pool_us} us" in choice.summary()


@pytest.mark.parametrize("private_us, expected", [(90, POOL_PRIVATE), (96.5, POOL_PRIVATE), (98, POOL), (110, POOL)])
def test_private_memory_replaces_the_pools_only_where_its_median_call_is_three_percent_faster(private_us, expected):
    choice = CallChoice([POOL, POOL_PRIVATE], pool=2)
    _trial(choice, {POOL: 100, POOL_PRIVATE: private_us})
    assert choice.chosen == expected, choice.summary()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(50, 200), min_size=4, max_size=4))
def test_the_chosen_setting_beats_the_compiled_one_by_the_margin_of_each_way_it_differs(times):
    choice = CallChoice([CAP, POOL, CAP_PRIVATE, POOL_PRIVATE], pool=2)
    median_us = dict(zip(choice.settings, times))
    _trial(choice, median_us)
    margins = {CAP: 1.0, POOL: THREAD_MARGIN, CAP_PRIVATE: MEMORY_MARGIN, POOL_PRIVATE: THREAD_MARGIN * MEMORY_MARGIN}
    chosen = choice.chosen
    assert median_us[chosen] <= margins[chosen] * median_us[CAP]
    for other in choice.settings:  # nothing else is faster by more than the margins between them
        assert median_us[chosen] / margins[chosen] <= median_us[other] / margins[other]


def test_a_trial_runs_again_only_once_its_calls_and_seconds_have_passed(monkeypatch):
    import csqc.call_choice as call_choice

    monkeypatch.setattr(call_choice, "TRIAL_PERIOD_CALLS", 5)
    choice = CallChoice([POOL, POOL_PRIVATE], pool=2)
    _trial(choice, {POOL: 100, POOL_PRIVATE: 50})
    assert choice.chosen == POOL_PRIVATE
    choice._next_trial = 0.0  # the seconds have passed; the calls not yet
    assert [choice.next_call() for _ in range(4)] == [(POOL_PRIVATE, False)] * 4
    assert choice.next_call()[1]  # the fifth call starts a trial
    choice._trial_call, choice._calls_since, choice._next_trial = -1, 0, float("inf")  # calls pass, seconds not
    assert all(not choice.next_call()[1] for _ in range(10))


def test_a_choice_needs_two_distinct_settings():
    with pytest.raises(ValueError, match="two distinct"):
        CallChoice([CAP], pool=2)
    with pytest.raises(ValueError, match="two distinct"):
        CallChoice([CAP, CallSetting(1, True)], pool=2)
    assert CallChoice([CAP, POOL], pool=2).summary() == "no trial finished yet (1 thread, shared memory until one does)"
