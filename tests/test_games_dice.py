"""Property tests of the pure game rules: amounts, the roll, the multiplier, bet validation."""

import hashlib
import hmac
import itertools
import math
import re
import statistics
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from games.bets import fingerprint, settle, validate_bet
from games.dice import (
    ACCEPT_BELOW,
    OUTCOMES,
    WINDOW_CHARS,
    WINDOWS,
    format_hundredths,
    format_multiplier,
    hmac_hex,
    is_win,
    multiplier_bp,
    parse_direction,
    parse_target,
    payout,
    roll,
    roll_from_hmac,
    winning_outcomes,
)
from games.errors import (
    BadMessage,
    BetLimit,
    InvalidAmount,
    InvalidSeed,
    InvalidTarget,
    StakeProError,
    UnknownCurrency,
)
from games.money import DEFAULT_CURRENCIES, Currency, format_amount, parse_amount
from games.seeds import (
    CLIENT_SEED_ALPHABET,
    new_client_seed,
    new_server_seed,
    parse_client_seed,
    server_seed_hash,
)
from games.types import Direction, Hundredths, Minor, MultiplierBp
from games.verify import main

USDT = DEFAULT_CURRENCIES["USDT"]
BTC = DEFAULT_CURRENCIES["BTC"]
currencies = st.sampled_from(list(DEFAULT_CURRENCIES.values()))
directions: st.SearchStrategy[Direction] = st.sampled_from(["under", "over"])
not_str = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
STRICT_AMOUNT = re.compile(r"([0-9]{1,20})(?:\.([0-9]+))?", re.ASCII)


# --- amounts -------------------------------------------------------------------------------


@given(currencies, st.integers(1, 10**28))
def test_amount_format_parse_round_trip(currency: Currency, minor: int) -> None:
    assume(minor < 10 ** (20 + currency.decimals))
    text = format_amount(minor, currency)
    assert text.count(".") == 1 and len(text.split(".")[1]) == currency.decimals
    assert parse_amount(text, currency) == minor


@given(currencies, st.text(alphabet="0123456789", min_size=1, max_size=20), st.data())
def test_amount_parse_agrees_with_decimal(
    currency: Currency, whole: str, data: st.DataObject
) -> None:
    fraction = data.draw(st.text(alphabet="0123456789", max_size=currency.decimals))
    text = f"{whole}.{fraction}" if fraction else whole
    exact = Decimal(text) * 10**currency.decimals
    if exact == 0:
        with pytest.raises(InvalidAmount):
            parse_amount(text, currency)
    else:
        assert parse_amount(text, currency) == exact
        assert Decimal(format_amount(parse_amount(text, currency), currency)) == Decimal(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "+1",
        "-1",
        "-0.01",
        "1e2",
        "1E2",
        "1e-2",
        " 1",
        "1 ",
        "1\n",
        "1_000",
        ".5",
        "5.",
        "1.2.3",
        "1,5",
        "0x10",
        "inf",
        "nan",
        "NaN",
        "Infinity",
        "١٢",
        "１２",
        "1.005",
        "10.505",
        "1.000",
        "0",
        "0.00",
        "00",
        "0.0",
        "1" * 21,
        "½",
    ],
)
def test_amount_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(text, USDT)


DECORATIONS = ["+{}", "-{}", " {}", "{} ", "\t{}", "{}\n", "{}e2", "{}E-1", "{}_0", "{},0", "0x{}"]


@given(currencies, st.integers(1, 10**12), st.sampled_from(DECORATIONS))
def test_amount_rejects_sign_exponent_space(currency: Currency, minor: int, shape: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(shape.format(format_amount(minor, currency)), currency)


@given(currencies, st.integers(0, 10**6), st.integers(1, 5), st.data())
def test_amount_rejects_too_many_decimals(
    currency: Currency, whole: int, extra: int, data: st.DataObject
) -> None:
    size = currency.decimals + extra
    fraction = data.draw(st.text(alphabet="0123456789", min_size=size, max_size=size))
    with pytest.raises(InvalidAmount):
        parse_amount(f"{whole}.{fraction}", currency)


def test_amount_decimals_per_currency() -> None:
    assert parse_amount("10.5", USDT) == parse_amount("10.50", USDT) == 1050
    assert parse_amount("0.00000005", BTC) == 5
    with pytest.raises(InvalidAmount):
        parse_amount("0.000000001", BTC)
    assert format_amount(0, USDT) == "0.00"
    assert format_amount(5, BTC) == "0.00000005"
    assert format_amount(-150, USDT) == "-1.50"
    assert format_amount(100_000_000, BTC) == "1.00000000"


@given(currencies, st.text(max_size=30))
@example(USDT, "1.000")
@example(USDT, "٣")
def test_amount_accepts_only_strict_decimals(currency: Currency, text: str) -> None:
    match = STRICT_AMOUNT.fullmatch(text)
    ok = match is not None and len(match.group(2) or "") <= currency.decimals and Decimal(text) > 0
    try:
        value = parse_amount(text, currency)
    except InvalidAmount:
        assert not ok
    else:
        assert ok
        assert value == Decimal(text) * 10**currency.decimals


@given(currencies, not_str)
def test_amount_of_wrong_type_is_bad_message(currency: Currency, value: object) -> None:
    with pytest.raises(BadMessage):
        parse_amount(value, currency)


# --- target, multiplier, payout -----------------------------------------------------------


def test_formats() -> None:
    assert format_hundredths(3721) == "37.21"
    assert format_hundredths(0) == "0.00"
    assert format_hundredths(10000) == "100.00"
    assert format_hundredths(5) == "0.05"
    assert format_multiplier(19800) == "1.9800"
    assert format_multiplier(99009900) == "9900.9900"


@given(st.integers(0, 99999))
def test_target_round_trip(hundredths: int) -> None:
    text = format_hundredths(hundredths)
    assert parse_target(text) == hundredths
    if hundredths % 100 == 0:
        assert parse_target(text[:-3]) == hundredths
    if hundredths % 10 == 0:
        assert parse_target(text[:-1]) == hundredths


@pytest.mark.parametrize(
    "text", ["", "50.001", "1000", "-1", "+5", "5.", ".5", "1e1", " 5", "5 ", "٥", "5_0", "abc"]
)
def test_target_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidTarget):
        parse_target(text)


@pytest.mark.parametrize("parse", [parse_target, parse_direction, parse_client_seed])
@given(value=not_str)
def test_text_fields_of_wrong_type_are_bad_message(
    parse: Callable[[object], object], value: object
) -> None:
    with pytest.raises(BadMessage):
        parse(value)


@pytest.mark.parametrize("value", ["", "Under", "OVER", "under ", "sideways", "<"])
def test_unknown_direction_is_bad_message(value: str) -> None:
    with pytest.raises(BadMessage):
        parse_direction(value)


def test_winning_outcomes_range_over_every_target() -> None:
    for target in range(0, OUTCOMES):
        for direction in ("under", "over"):
            expected = target if direction == "under" else 10000 - target
            if 1 <= expected <= 9800:
                assert winning_outcomes(Hundredths(target), direction) == expected
            else:
                with pytest.raises(InvalidTarget):
                    winning_outcomes(Hundredths(target), direction)


@given(st.integers(1, 9800), directions)
@example(1, "under")
@example(9800, "under")
@example(1, "over")
@example(9800, "over")
def test_win_iff_roll_in_winning_set(winning: int, direction: Direction) -> None:
    target = Hundredths(winning if direction == "under" else 10000 - winning)
    assert winning_outcomes(target, direction) == winning
    winners = set(range(0, target)) if direction == "under" else set(range(target + 1, OUTCOMES))
    wins = {r for r in range(OUTCOMES) if is_win(Hundredths(r), target, direction)}
    assert wins == winners
    assert len(wins) == winning


@given(st.integers(1, OUTCOMES), st.integers(0, 9999))
@example(1, 100)
@example(9800, 100)
@example(5000, 0)
def test_multiplier_is_floor_to_four_decimals(winning: int, edge_bp: int) -> None:
    m = multiplier_bp(winning, edge_bp)
    assert m * winning <= (10000 - edge_bp) * OUTCOMES < (m + 1) * winning


@given(st.integers(1, 10**22), st.integers(1, 9800), st.integers(0, 9999))
def test_payout_never_exceeds_true_multiplier(amount: int, winning: int, edge_bp: int) -> None:
    paid = payout(Minor(amount), multiplier_bp(winning, edge_bp))
    # paid <= amount * (1 - edge) * 10001 / W, exactly in integers
    assert paid * 10000 * winning <= amount * (10000 - edge_bp) * OUTCOMES
    assert paid == amount * multiplier_bp(winning, edge_bp) // 10000


def test_multiplier_examples() -> None:
    assert multiplier_bp(5000) == MultiplierBp(19801)
    assert multiplier_bp(1) == MultiplierBp(99009900)
    assert payout(Minor(100), MultiplierBp(19801)) == 198


# --- the roll -------------------------------------------------------------------------------

seed_text = st.text(min_size=1, max_size=80)
client_seeds = st.text(alphabet=CLIENT_SEED_ALPHABET, min_size=1, max_size=64)
nonces = st.integers(0, 2**63 - 1)


@given(seed_text, client_seeds, nonces)
def test_roll_agrees_with_seed_recipe_when_first_window_accepted(
    server_seed: str, client_seed: str, nonce: int
) -> None:
    h = hmac_hex(server_seed, client_seed, nonce)
    assert (
        h == hmac.new(server_seed.encode(), f"{client_seed}:{nonce}".encode(), "sha256").hexdigest()
    )
    value, windows = roll_from_hmac(h)
    assert value == roll(server_seed, client_seed, nonce)
    first = int(h[:5], 16)
    if first < ACCEPT_BELOW:
        assert value == first % 10001
        assert windows == [h[:5]]
    else:
        assert len(windows) > 1


@st.composite
def hmacs_with_rejections(draw: st.DrawFn) -> str:
    """HMAC-shaped hex whose windows are rejected far more often than in real life."""
    values = [
        draw(st.one_of(st.integers(ACCEPT_BELOW, 16**5 - 1), st.integers(0, ACCEPT_BELOW - 1)))
        for _ in range(WINDOWS)
    ]
    tail = draw(st.text(alphabet="0123456789abcdef", min_size=4, max_size=4))
    return "".join(f"{v:05x}" for v in values) + tail


@given(hmacs_with_rejections())
@example("f" * 64)
@example("fe0e8" * 12 + "0000")  # 1040104: the first rejected value, everywhere
def test_roll_takes_first_accepted_window(h: str) -> None:
    value, windows = roll_from_hmac(h)
    assert 1 <= len(windows) <= WINDOWS
    for i, window in enumerate(windows):
        assert window == h[i * WINDOW_CHARS : (i + 1) * WINDOW_CHARS]
    assert all(int(w, 16) >= ACCEPT_BELOW for w in windows[:-1])
    last = int(windows[-1], 16)
    assert last < ACCEPT_BELOW or len(windows) == WINDOWS
    assert value == last % OUTCOMES
    assert 0 <= value <= 10000


@pytest.mark.parametrize("bad", ["", "0" * 63, "0" * 65, "F" * 64, "g" * 64, "_" + "0" * 63])
def test_roll_from_hmac_rejects_non_hmac(bad: str) -> None:
    with pytest.raises(ValueError):
        roll_from_hmac(bad)


def test_rejection_makes_every_outcome_equally_likely_exactly() -> None:
    """Over all 16**5 window values: the accepted ones hit each outcome exactly 104 times,
    while the seed recipe hits 0.00 ... 84.71 105 times and the rest 104 times."""
    accepted = [0] * OUTCOMES
    recipe = [0] * OUTCOMES
    for v in range(16**WINDOW_CHARS):
        recipe[v % OUTCOMES] += 1
        if v < ACCEPT_BELOW:
            accepted[v % OUTCOMES] += 1
    assert set(accepted) == {104}
    assert recipe[:8472] == [105] * 8472 and recipe[8472:] == [104] * (OUTCOMES - 8472)


CHI_N = 1_000_000
CHI_P = 1e-6  # total false-alarm probability, split between the two tails
LOW_CELL = 8472  # the seed recipe favours outcomes 0 ... 8471 (0.00 ... 84.71)


def _chi_square_bounds(df: int, p: float) -> tuple[float, float]:
    """Wilson-Hilferty: (chi2/df)**(1/3) is close to normal, mean 1 - 2/(9 df), var 2/(9 df)."""
    z = statistics.NormalDist().inv_cdf(1 - p / 2)
    mean, sd = 1 - 2 / (9 * df), math.sqrt(2 / (9 * df))
    return df * (mean - z * sd) ** 3, df * (mean + z * sd) ** 3


def _low_cell_z(low: int, n: int) -> float:
    """z of the count of outcomes in 0 ... 8471 against the fair share 8472/10001."""
    share = LOW_CELL / OUTCOMES
    return (low - n * share) / math.sqrt(n * share * (1 - share))


@pytest.mark.slow
def test_rolls_are_uniform_and_the_seed_recipe_is_caught() -> None:
    """10**6 rolls from roll_from_hmac pass a 10,001-bin chi-square test, and the seed recipe
    over the same HMACs is caught.

    The seed recipe's bias (+0.96 % on 8,472 outcomes) is too small for the 10,001-bin
    statistic at 10**6 rolls: its non-centrality is about 12 against a standard deviation of
    141. The test aimed at it counts outcomes 0.00 ... 84.71: the fair rolls must stay
    within |z| < 4.9 (p = 1e-6), and the recipe applied to all 12 windows of the same HMACs
    (12 * 10**6 uniform 20-bit values; expected z ~ 11.7) must exceed it.
    """
    server_seed = "86832a47cf91b293d1df743c12c4be5c0002fd2684fe7a25d549882750aacf40"
    client_seed = "chi-square"
    keyed = hmac.new(server_seed.encode(), digestmod=hashlib.sha256)
    assert _hmac_of(keyed, client_seed, 7) == hmac_hex(server_seed, client_seed, 7)

    recipe_low = bytearray(16**WINDOW_CHARS)  # 1 where v mod 10001 falls in 0 ... 8471
    for start in range(0, 16**WINDOW_CHARS, OUTCOMES):
        recipe_low[start : start + LOW_CELL] = b"\x01" * len(recipe_low[start : start + LOW_CELL])
    mask = 16**WINDOW_CHARS - 1
    shifts = tuple(4 * WINDOW_CHARS * (WINDOWS - 1 - i) for i in range(WINDOWS))

    counts = [0] * OUTCOMES
    recipe_hits = 0
    for nonce in range(CHI_N):
        h = _hmac_of(keyed, client_seed, nonce)
        counts[roll_from_hmac(h)[0]] += 1
        windows = int(h[: WINDOWS * WINDOW_CHARS], 16)
        for shift in shifts:
            recipe_hits += recipe_low[(windows >> shift) & mask]

    expected = CHI_N / OUTCOMES
    chi2 = sum((c - expected) ** 2 for c in counts) / expected
    lo, hi = _chi_square_bounds(OUTCOMES - 1, CHI_P)
    assert lo < chi2 < hi, (lo, chi2, hi)

    z_limit = statistics.NormalDist().inv_cdf(1 - CHI_P / 2)
    z_fair = _low_cell_z(sum(counts[:LOW_CELL]), CHI_N)
    assert abs(z_fair) < z_limit, z_fair
    z_recipe = _low_cell_z(recipe_hits, WINDOWS * CHI_N)
    assert z_recipe > z_limit, z_recipe


def _hmac_of(keyed: "hmac.HMAC", client_seed: str, nonce: int) -> str:
    mac = keyed.copy()
    mac.update(f"{client_seed}:{nonce}".encode())
    return mac.hexdigest()


# --- seeds -------------------------------------------------------------------------------


@given(client_seeds)
def test_client_seed_accepts_alphabet(seed: str) -> None:
    assert parse_client_seed(seed) == seed


@given(st.text(max_size=80))
@example("")
@example("a" * 65)
@example("abc\n")
@example("ä")
@example("a b")
def test_client_seed_rejects_everything_else(seed: str) -> None:
    ok = 1 <= len(seed) <= 64 and all(c in CLIENT_SEED_ALPHABET for c in seed)
    if ok:
        assert parse_client_seed(seed) == seed
    else:
        with pytest.raises(InvalidSeed):
            parse_client_seed(seed)


def test_new_seeds() -> None:
    server_seed = new_server_seed()
    assert re.fullmatch("[0-9a-f]{64}", server_seed)
    assert server_seed_hash(server_seed) == hashlib.sha256(server_seed.encode()).hexdigest()
    client_seed = new_client_seed()
    assert len(client_seed) == 16 and parse_client_seed(client_seed) == client_seed
    assert new_server_seed() != server_seed


# --- bets ---------------------------------------------------------------------------------

# Each field is drawn as valid, as a bad value, or as a wrong type; the expected error is
# the first failing check in PROTOCOL.md's order.
CURRENCY_CASES: dict[str, list[object]] = {
    "ok": ["USDT", "BTC"],
    "value": ["EUR", "usdt", ""],
    "type": [1, None, b"USDT"],
}
AMOUNT_CASES: dict[str, list[object]] = {
    "ok": ["1", "0.5"],
    "value": ["1.000000001", "-1", "0", "", "1e3"],
    "type": [1, 1.5, None],
    "limit": ["100000"],
}
TARGET_CASES: dict[str, list[object]] = {
    "ok": ["50", "49.5"],
    "value": ["50.001", "abc", "", "0.00", "100"],
    "type": [50, None],
}
DIRECTION_CASES: dict[str, list[object]] = {
    "ok": ["under", "over"],
    "type": ["sideways", "UNDER", None, 1],
}


def _cases(cases: dict[str, list[object]]) -> list[tuple[str, object]]:
    return [(kind, value) for kind, values in cases.items() for value in values]


def test_validate_bet_error_order() -> None:
    """Every combination of valid, bad-value and wrong-type fields (about 4,000)."""
    combos = itertools.product(
        _cases(CURRENCY_CASES), _cases(AMOUNT_CASES), _cases(TARGET_CASES), _cases(DIRECTION_CASES)
    )
    for currency, amount, target, direction in combos:
        kinds = (currency[0], amount[0], target[0], direction[0])
        if "type" in kinds:
            expected: type[StakeProError] | None = BadMessage
        elif currency[0] == "value":
            expected = UnknownCurrency
        elif amount[0] == "value":
            expected = InvalidAmount
        elif target[0] == "value":
            expected = InvalidTarget
        elif amount[0] == "limit":
            expected = BetLimit
        else:
            expected = None
        fields = (currency[1], amount[1], target[1], direction[1])
        try:
            spec = validate_bet(*fields, DEFAULT_CURRENCIES)
        except StakeProError as error:
            assert type(error) is expected, (fields, error)
        else:
            assert expected is None, fields
            assert spec.currency.code == currency[1]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        (("EUR", "1.001", "50", "under"), "UNKNOWN_CURRENCY"),
        (("USDT", "1.001", "50.001", "under"), "INVALID_AMOUNT"),
        (("EUR", "1", "50", "sideways"), "BAD_MESSAGE"),
        (("USDT", 1, "bad", "under"), "BAD_MESSAGE"),
        (("USDT", "1", "99", "under"), "INVALID_TARGET"),
        (("USDT", "10000.01", "50", "under"), "BET_LIMIT"),
        (("USDT", "10.11", "0.01", "under"), "BET_LIMIT"),  # profit over 100,000.00
        (("BTC", "0.00102", "99.99", "over"), "BET_LIMIT"),  # profit over 10 BTC
    ],
)
def test_validate_bet_examples(fields: tuple[object, object, object, object], code: str) -> None:
    currency, amount, target, direction = fields
    with pytest.raises(StakeProError) as raised:
        validate_bet(currency, amount, target, direction, DEFAULT_CURRENCIES)
    assert raised.value.code == code


def test_max_profit_boundary() -> None:
    # 10.00 at 0.01 under pays 99,009.90: profit 98,999.90, within 100,000.00
    spec = validate_bet("USDT", "10.10", "0.01", "under", DEFAULT_CURRENCIES)
    assert spec.payout_if_win - spec.amount <= USDT.max_profit
    assert validate_bet("BTC", "0.00000001", "98", "under", DEFAULT_CURRENCIES).amount == 1


@given(currencies, st.integers(1, 10**9), st.integers(1, 9800), directions)
def test_settle_pays_on_win_only(
    currency: Currency, amount: int, winning: int, direction: Direction
) -> None:
    target = winning if direction == "under" else 10000 - winning
    try:
        spec = validate_bet(
            currency.code,
            format_amount(amount, currency),
            format_hundredths(target),
            direction,
            DEFAULT_CURRENCIES,
        )
    except BetLimit:
        return
    assert spec.winning == winning
    assert fingerprint(spec) == f"{currency.code}|{amount}|{target}|{direction}"
    for r in (0, target - 1, target, target + 1, 10000):
        if 0 <= r <= 10000:
            outcome = settle(spec, Hundredths(r))
            assert outcome.win == is_win(Hundredths(r), spec.target, direction)
            assert outcome.payout == (spec.payout_if_win if outcome.win else 0)


def test_fingerprint_normalises_text() -> None:
    a = validate_bet("USDT", "1", "50", "under", DEFAULT_CURRENCIES)
    b = validate_bet("USDT", "1.00", "50.00", "under", DEFAULT_CURRENCIES)
    assert fingerprint(a) == fingerprint(b) == "USDT|100|5000|under"


# --- the verifier CLI -------------------------------------------------------------------


def test_verify_cli_prints_each_step(capsys: pytest.CaptureFixture[str]) -> None:
    server_seed = "86832a47cf91b293d1df743c12c4be5c0002fd2684fe7a25d549882750aacf40"
    code = main(
        ["--server-seed", server_seed, "--client-seed", "player-chosen-seed", "--nonce", "60559"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert '"player-chosen-seed:60559"' in out
    assert "fe13dfe9df642841f12895457dffefdbadfa1f335fb1d49a0c5fcbf963af9f47" in out
    assert "aa2d8e96136deeebab690318f6c6a8fe2a9044c1a8ab8aae32ca47a76206a70f" in out
    windows = [line for line in out.splitlines() if line.strip().startswith("window ")]
    assert len(windows) == 3
    assert "fe13d = 1040701 rejected (>= 1040104)" in windows[0]
    assert "fe9df = 1042911 rejected (>= 1040104)" in windows[1]
    assert "64284 = 410244 accepted" in windows[2]
    assert out.rstrip().endswith("= 2.03")
    assert "410244 mod 10001" in out


def test_verify_cli_rejects_negative_nonce(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--server-seed", "s", "--client-seed", "c", "--nonce", "-1"])
    assert raised.value.code == 2
