"""The retry schedule: delays with jitter, exhaustion, Retry-After, durations and schedules."""

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyhook.retry import (
    DEFAULT_JITTER,
    DEFAULT_SCHEDULE,
    max_attempts,
    next_delay,
    parse_duration,
    parse_retry_after,
    parse_schedule,
)

# No example database: tests must not leave files in the tree.
quick = settings(database=None, max_examples=60)

schedules = st.lists(
    st.floats(min_value=0.001, max_value=1e6, allow_nan=False), min_size=1, max_size=10
)
jitters = st.floats(min_value=0, max_value=1)
seeds = st.integers(min_value=0, max_value=2**32)


def within(value, low, high):
    # Multiplying by (1 ± jitter) can land a rounding error outside the exact bound.
    slack = 1e-9 * max(abs(low), abs(high), 1.0)
    return low - slack <= value <= high + slack


# --- the default schedule --------------------------------------------------------------


def test_default_schedule_is_six_attempts_over_fifteen_and_a_half_minutes():
    delays = [next_delay(attempt, DEFAULT_SCHEDULE, jitter=0) for attempt in range(1, 7)]
    assert delays == [30, 60, 120, 240, 480, None]
    assert max_attempts(DEFAULT_SCHEDULE) == 6
    assert sum(DEFAULT_SCHEDULE) / 60 == 15.5


def test_default_jitter_spreads_the_first_retry_over_27_to_33_seconds():
    rng = random.Random(1)
    delays = [next_delay(1, DEFAULT_SCHEDULE, DEFAULT_JITTER, rng=rng) for _ in range(1000)]
    assert all(27 <= delay <= 33 for delay in delays)
    # Jitter that always picks the same value would be no jitter at all.
    assert min(delays) < 28
    assert max(delays) > 32


def test_the_same_seed_gives_the_same_delay():
    first = next_delay(3, DEFAULT_SCHEDULE, 0.1, rng=random.Random(42))
    second = next_delay(3, DEFAULT_SCHEDULE, 0.1, rng=random.Random(42))
    assert first == second


def test_full_jitter_is_never_negative():
    rng = random.Random(7)
    assert all(next_delay(1, (1.0,), 1.0, rng=rng) >= 0 for _ in range(1000))


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_are_numbered_from_one(attempt):
    with pytest.raises(ValueError, match="start at 1"):
        next_delay(attempt, DEFAULT_SCHEDULE, 0.1)


@pytest.mark.parametrize("jitter", [-0.1, 1.5])
def test_jitter_must_be_a_fraction(jitter):
    with pytest.raises(ValueError, match="between 0 and 1"):
        next_delay(1, DEFAULT_SCHEDULE, jitter)


# --- properties ------------------------------------------------------------------------


@quick
@given(schedule=schedules, jitter=jitters, seed=seeds)
def test_every_delay_is_its_slot_plus_or_minus_jitter(schedule, jitter, seed):
    rng = random.Random(seed)
    for attempt, slot in enumerate(schedule, start=1):
        delay = next_delay(attempt, schedule, jitter, rng=rng)
        assert delay is not None
        assert within(delay, slot * (1 - jitter), slot * (1 + jitter))


@quick
@given(schedule=schedules, jitter=jitters, seed=seeds)
def test_retries_are_exhausted_exactly_after_len_plus_one_attempts(schedule, jitter, seed):
    rng = random.Random(seed)
    attempts_made = 1
    while next_delay(attempts_made, schedule, jitter, rng=rng) is not None:
        attempts_made += 1
    assert attempts_made == len(schedule) + 1 == max_attempts(schedule)
    assert next_delay(attempts_made + 10, schedule, jitter, rng=rng) is None


@quick
@given(schedule=schedules, jitter=jitters, seed=seeds)
def test_the_whole_retry_window_stays_within_bounds(schedule, jitter, seed):
    rng = random.Random(seed)
    window = sum(
        next_delay(attempt, schedule, jitter, rng=rng) for attempt in range(1, len(schedule) + 1)
    )
    total = sum(schedule)
    assert within(window, total * (1 - jitter), total * (1 + jitter))


@quick
@given(
    schedule=schedules,
    jitter=jitters,
    seed=seeds,
    data=st.data(),
    retry_after=st.floats(min_value=0, max_value=1e7, allow_nan=False),
)
def test_retry_after_is_honoured_up_to_the_longest_delay(schedule, jitter, seed, data, retry_after):
    attempt = data.draw(st.integers(min_value=1, max_value=len(schedule)))
    scheduled = next_delay(attempt, schedule, jitter, rng=random.Random(seed))
    delay = next_delay(attempt, schedule, jitter, retry_after, rng=random.Random(seed))
    longest = max(schedule)
    # Never earlier than the receiver asked (up to the cap), never earlier than scheduled,
    # never later than the longest scheduled delay unless the schedule's own jitter says so.
    assert delay >= min(retry_after, longest)
    assert delay >= scheduled
    assert delay <= max(longest, scheduled)


def test_retry_after_longer_than_the_schedule_is_capped():
    assert next_delay(1, DEFAULT_SCHEDULE, 0, retry_after_s=86400) == 480
    assert next_delay(1, DEFAULT_SCHEDULE, 0, retry_after_s=100) == 100
    assert next_delay(4, DEFAULT_SCHEDULE, 0, retry_after_s=100) == 240


# --- Retry-After -----------------------------------------------------------------------


NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("Sat, 01 Mar 2025 12:01:30 GMT", 90.0),
        ("Sat, 01 Mar 2025 13:00:00 +0100", 0.0),
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),
        ("Sat, 01 Mar 2025 12:00:10 -0000", 10.0),
    ],
)
def test_parse_retry_after_reads_seconds_and_http_dates(header, seconds):
    assert parse_retry_after(header, now=NOW) == seconds


@pytest.mark.parametrize(
    "header", [None, "", "   ", "soon", "-5", "1e3", "Sat, 32 Mar 2025 12:00:00 GMT"]
)
def test_parse_retry_after_gives_none_when_absent_or_unreadable(header):
    assert parse_retry_after(header, now=NOW) is None


def test_parse_retry_after_takes_a_naive_now_as_utc():
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after("Sat, 01 Mar 2025 12:00:30 GMT", now=naive) == 30.0


def test_parse_retry_after_reads_a_date_against_the_answers_own_date():
    # The receiver's Date says when it answered on its own clock: the delay it meant is
    # the difference, whatever our clock reads.
    header = "Sat, 01 Mar 2025 12:01:30 GMT"
    an_hour_late = NOW + timedelta(hours=1)
    assert parse_retry_after(header, now=an_hour_late, date="Sat, 01 Mar 2025 12:01:28 GMT") == 2.0
    # An unreadable Date is no better than none: our clock it is.
    assert parse_retry_after(header, now=NOW, date="yesterday") == 90.0
    # Delta-seconds need no date at all.
    assert parse_retry_after("5", now=NOW, date="Sat, 01 Mar 2025 13:00:00 GMT") == 5.0


def test_parse_retry_after_defaults_to_the_current_time():
    in_an_hour = (datetime.now(UTC) + timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 3590 <= parse_retry_after(in_an_hour) <= 3600


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (30, 30.0),
        (1.5, 1.5),
        ("1.5", 1.5),
        (".5", 0.5),
        ("0", 0.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("24h", 86400.0),
        ("5d", 432000.0),
        (" 5 m ", 300.0),
    ],
)
def test_parse_duration_reads_seconds_and_units(value, seconds):
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "  ",
        "-5",
        -5,
        -0.5,
        "5x",
        "5 minutes",
        "5M",
        "m",
        "5.",
        "1e3",
        "inf",
        "nan",
        math.inf,
        math.nan,
        True,
        "9" * 400,
    ],
)
def test_parse_duration_rejects_anything_else_and_says_what_is_allowed(value):
    with pytest.raises(ValueError, match=r"is not a duration|too large") as raised:
        parse_duration(value)
    if "too large" not in str(raised.value):
        assert "s, m, h or d" in str(raised.value)


UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@quick
@given(
    number=st.integers(min_value=0, max_value=10**9), unit=st.sampled_from(["", "s", "m", "h", "d"])
)
def test_parse_duration_round_trips_integers_with_units(number, unit):
    assert parse_duration(f"{number}{unit}") == number * UNIT_SECONDS.get(unit, 1)
    assert parse_duration(number) == number


@quick
@given(seconds=st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_parse_duration_round_trips_decimal_seconds(seconds):
    text = f"{seconds:.6f}"
    assert parse_duration(text) == float(text)
    assert parse_duration(f"{text}s") == float(text)
    assert parse_duration(seconds) == seconds


# --- schedules -------------------------------------------------------------------------


def test_parse_schedule_reads_the_default():
    assert parse_schedule("30,60,120,240,480") == DEFAULT_SCHEDULE


def test_parse_schedule_accepts_units_spaces_and_sequences():
    assert parse_schedule("30s, 1m , 2m,1h") == (30.0, 60.0, 120.0, 3600.0)
    assert parse_schedule([30, 60.5]) == (30.0, 60.5)
    assert parse_schedule(("10s",)) == (10.0,)  # settings may hand over what the env held


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "at least one delay"),
        ("  ", "at least one delay"),
        ([], "at least one delay"),
        ("30,,60", "delay 2: '' is not a duration"),
        ("30,0", "delay 2 must be more than 0"),
        ("30,60,-1", "delay 3: '-1' is not a duration"),
        ("30,soon", "delay 2: 'soon' is not a duration"),
        ("30;60", "delay 1: '30;60' is not a duration"),
        ([30, 0], "delay 2 must be more than 0"),
    ],
)
def test_parse_schedule_rejects_bad_schedules_naming_the_delay(value, complaint):
    with pytest.raises(ValueError, match=complaint):
        parse_schedule(value)


@quick
@given(schedule=st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=10))
def test_parse_schedule_round_trips(schedule):
    assert parse_schedule(",".join(map(str, schedule))) == tuple(map(float, schedule))
