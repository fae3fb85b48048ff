"""The demo flow: a synthetic clickstream, no servers needed (``sluiceway demo``).

::

    clicks -> enrich -> event_time -> drop_bots -> is_purchase -+- true --> price -+
                                                                +- false ----------+-> merge
        merge -> window_1s -+-> summarize -> summaries
                            +-> late clicks (the window's late side output)

``clicks`` is a seeded, rate-paced :class:`~sluiceway.sources.Generator` of click events;
``enrich`` parses the raw fields (amount text to a number in EUR, bot detection from the
user agent); ``event_time`` gives each click its timestamp, with watermarks that allow it
to arrive up to half a second out of order; ``drop_bots`` filters the bots out;
``is_purchase`` branches purchases from page views; ``price`` computes the net revenue of
a purchase; the two branches merge again (the merged watermark is the slower branch's)
into an event-time tumbling window of one second, aggregated incrementally by
:class:`ClickStats` into one :class:`WindowSummary` per second.  The few clicks that
arrive more than half a second out of order, after their second has closed, go to the
window's late output.

>>> import sluiceway as sw
>>> out = sw.sinks.Collect()
>>> flow = build_demo_flow(rate=100, seed=1, sink=out)
>>> async def stop_after_2s(handle: sw.FlowHandle) -> None:
...     await handle.clock.sleep(2.0)
...     handle.request_stop()
>>> result = sw.run(flow, clock=sw.VirtualClock(), monitor=stop_after_2s)
>>> [s["events"] for s in out.items]  # clicks left after the bot filter, per second
[96, 92]
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Iterator
from typing import Literal, TypedDict

import sluiceway as sw

__all__ = [
    "DEFAULT_EPOCH",
    "Click",
    "ClickStats",
    "LateCounter",
    "RawClick",
    "SummaryTracker",
    "WindowSummary",
    "build_demo_flow",
    "enrich",
    "format_summary",
    "generate_clicks",
    "summarize",
    "window_per_second",
]

DEFAULT_EPOCH = 1_700_000_000.0
"""Event time of the first click (seconds since the Unix epoch) unless told otherwise."""

PAGES: tuple[str, ...] = (  # most viewed first (Zipf-like weights by rank)
    "/",
    "/product/1",
    "/search",
    "/product/2",
    "/cart",
    *(f"/product/{i}" for i in range(3, 31)),
    "/checkout",
)
_PAGE_CUM_WEIGHTS = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(PAGES))))
_HUMAN_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Mobile/15E148 Safari/604.1",
)
_BOT_AGENTS = ("Googlebot/2.1 (+http://www.google.com/bot.html)", "curl/8.6.0", "python-requests")
_BOT_MARKERS = ("bot", "curl", "python-requests")
_CURRENCIES = ("EUR", "USD", "GBP")
_CURRENCY_CUM_WEIGHTS = (6, 9, 10)
_TO_EUR = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17}
_VAT = 0.20
_BOT_SHARE = 0.05
_PURCHASE_SHARE = 0.05  # of product page views
_LATE_SHARE = 0.02  # clicks that arrive out of order, up to _MAX_LATENESS seconds late
_MAX_LATENESS = 0.8


class RawClick(TypedDict):
    """A click as the (imaginary) web tier sends it: every field still a string or float."""

    user: str
    page: str
    ts: float
    action: Literal["view", "purchase"]
    amount: str
    currency: str
    ua: str


class Click(TypedDict):
    """A parsed, enriched click."""

    user: str
    page: str
    section: str
    ts: float
    action: Literal["view", "purchase"]
    amount_eur: float
    revenue: float
    is_bot: bool


class WindowSummary(TypedDict):
    """What one window of clicks adds up to."""

    start: float
    end: float
    events: int
    views: int
    purchases: int
    revenue: float
    users: int
    top_pages: list[tuple[str, int]]


def generate_clicks(*, rate: float, seed: int, epoch: float = DEFAULT_EPOCH) -> Iterator[RawClick]:
    """An endless, reproducible stream of raw clicks.

    Event time advances by ``1 / rate`` per click from ``epoch``; a few clicks arrive late
    (out of order) by up to 0.8 s, as they do from real browsers.

    >>> clicks = generate_clicks(rate=10, seed=7)
    >>> [c["page"] for c in itertools.islice(clicks, 4)]
    ['/', '/product/22', '/product/1', '/']
    """
    rng = random.Random(seed)
    prices = {page: round(rng.uniform(5, 250), 2) for page in PAGES}
    for i in itertools.count():
        ts = epoch + i / rate
        if rng.random() < _LATE_SHARE:  # out of order, but not from before the epoch
            ts = max(epoch, ts - rng.uniform(0.0, _MAX_LATENESS))
        page = rng.choices(PAGES, cum_weights=_PAGE_CUM_WEIGHTS)[0]
        bot = rng.random() < _BOT_SHARE
        ua = rng.choice(_BOT_AGENTS if bot else _HUMAN_AGENTS)
        action: Literal["view", "purchase"] = "view"
        amount, currency = "0", "EUR"
        if page.startswith("/product/") and rng.random() < _PURCHASE_SHARE:
            action = "purchase"
            currency = rng.choices(_CURRENCIES, cum_weights=_CURRENCY_CUM_WEIGHTS)[0]
            amount = f"{prices[page] / _TO_EUR[currency]:.2f}"
        yield {
            "user": f"u{rng.randrange(1, 5000):04d}",
            "page": page,
            "ts": round(ts, 3),
            "action": action,
            "amount": amount,
            "currency": currency,
            "ua": ua,
        }


def enrich(raw: RawClick) -> Click:
    """Parse the raw fields: the amount in EUR, the site section, whether it is a bot.

    >>> enrich({"user": "u1", "page": "/product/3", "ts": 1.5, "action": "purchase",
    ...         "amount": "10.00", "currency": "USD", "ua": "curl/8.6.0"})["amount_eur"]
    9.2
    """
    ua = raw["ua"].lower()
    section = raw["page"].split("/")[1] or "home"
    return {
        "user": raw["user"],
        "page": raw["page"],
        "section": section,
        "ts": raw["ts"],
        "action": raw["action"],
        "amount_eur": round(float(raw["amount"]) * _TO_EUR[raw["currency"]], 2),
        "revenue": 0.0,
        "is_bot": any(marker in ua for marker in _BOT_MARKERS),
    }


def _is_human(click: Click) -> bool:
    return not click["is_bot"]


def _is_purchase(click: Click) -> bool:
    return click["action"] == "purchase"


def _price(click: Click) -> Click:
    """Net revenue of a purchase: the amount in EUR without VAT."""
    return {**click, "revenue": round(click["amount_eur"] / (1 + _VAT), 2)}


class _Stats:
    """The accumulator of one window: counts, not clicks."""

    __slots__ = ("end", "events", "purchases", "revenue", "start", "users", "views")

    def __init__(self) -> None:
        self.events = 0
        self.purchases = 0
        self.revenue = 0.0
        self.users: set[str] = set()
        self.views: Counter[str] = Counter()
        self.start = math.inf
        self.end = -math.inf


class ClickStats(sw.agg.Aggregator[_Stats, WindowSummary]):
    """An incremental aggregator: a window keeps page counts and user ids, not clicks.

    Its result's ``start``/``end`` are the earliest and latest click times seen.
    """

    def create(self) -> _Stats:
        return _Stats()

    def add(self, acc: _Stats, value: Click) -> _Stats:
        acc.events += 1
        if value["action"] == "purchase":
            acc.purchases += 1
            acc.revenue += value["revenue"]
        else:
            acc.views[value["page"]] += 1
        acc.users.add(value["user"])
        acc.start = min(acc.start, value["ts"])
        acc.end = max(acc.end, value["ts"])
        return acc

    def merge(self, acc1: _Stats, acc2: _Stats) -> _Stats:
        out = _Stats()
        for acc in (acc1, acc2):
            out.events += acc.events
            out.purchases += acc.purchases
            out.revenue += acc.revenue
            out.users |= acc.users
            out.views.update(acc.views)
            out.start = min(out.start, acc.start)
            out.end = max(out.end, acc.end)
        return out

    def result(self, acc: _Stats) -> WindowSummary:
        return {
            "start": acc.start if acc.events else 0.0,
            "end": acc.end if acc.events else 0.0,
            "events": acc.events,
            "views": sum(acc.views.values()),
            "purchases": acc.purchases,
            "revenue": round(acc.revenue, 2),
            "users": len(acc.users),
            "top_pages": acc.views.most_common(3),
        }


def summarize(clicks: list[Click]) -> WindowSummary:
    """Add up a list of clicks the way a window does (:class:`ClickStats`).

    >>> c = enrich({"user": "u1", "page": "/", "ts": 3.0, "action": "view", "amount": "0",
    ...             "currency": "EUR", "ua": "Mozilla"})
    >>> summarize([c, c])["top_pages"]
    [('/', 2)]
    """
    stats = ClickStats()
    acc = stats.create()
    for c in clicks:
        acc = stats.add(acc, c)
    return stats.result(acc)


def _with_bounds(result: sw.WindowResult) -> WindowSummary:
    """A window's summary, stamped with the window's bounds."""
    summary: WindowSummary = result.value
    return {**summary, "start": result.start, "end": result.end}


def window_per_second(stream: sw.Stream[Click]) -> sw.WindowResultStream:
    """The windowing step: every second of event time into one :class:`WindowSummary`.

    An event-time tumbling window of one second over all clicks (not per key); its
    ``late()`` output has the clicks that came after their second closed.
    """
    return stream.window(sw.windows.Tumbling(1.0)).aggregate(ClickStats(), name="window_1s")


def build_demo_flow(
    *,
    rate: float = 2000.0,
    seed: int = 42,
    sink: sw.sinks.Sink | None = None,
    epoch: float = DEFAULT_EPOCH,
    late: sw.sinks.Sink | None = None,
) -> sw.Flow:
    """The demo clickstream flow.

    Args:
        rate: clicks per second (on the flow's clock).
        seed: seeds the click generator; the same seed gives the same clicks.
        sink: receives one :class:`WindowSummary` per window (default: printed as JSON
            lines on stdout, so ``sluiceway run sluiceway.demo:build_demo_flow`` works).
        epoch: event time of the first click.
        late: receives the clicks that arrived after their window closed, as
            :class:`~sluiceway.LateRecord` (default: counted and dropped).
    """
    if not (isinstance(rate, int | float) and rate > 0):
        raise ValueError(f"demo rate must be > 0 clicks/s, got {rate!r}")
    flow = sw.Flow("demo-clickstream")
    source = sw.sources.Generator(
        lambda: generate_clicks(rate=rate, seed=seed, epoch=epoch), rate=rate
    )
    clicks = (
        flow.source(source, name="clicks")
        .map(enrich, name="enrich")
        .with_timestamps(_timestamp, max_out_of_orderness=0.5, name="event_time")
    )
    humans = clicks.filter(_is_human, name="drop_bots")
    purchases, views = humans.branch(_is_purchase, name="is_purchase")
    priced = purchases.map(_price, name="price")
    merged: sw.Stream[Click] = priced.merge(views, name="merge")
    windows = window_per_second(merged)
    summaries = windows.map(_with_bounds, name="summarize")
    summaries.sink(sink if sink is not None else sw.sinks.Stdout(), name="summaries")
    windows.late().sink(late if late is not None else LateCounter(), name="late_clicks")
    return flow


def _timestamp(click: Click) -> float:
    return click["ts"]


class LateCounter(sw.sinks.Sink):
    """Counts late clicks (the default home of the window's late output)."""

    def __init__(self) -> None:
        self.count = 0

    async def write(self, batch: sw.Batch) -> None:
        self.count += len(batch.values)


class SummaryTracker(sw.sinks.Sink):
    """A sink that keeps the latest summaries (bounded) and running totals.

    Attributes:
        recent: the last ``keep`` summaries, oldest first.
        windows, events, purchases, revenue: totals over every summary received.
    """

    def __init__(self, keep: int = 100) -> None:
        self.recent: deque[WindowSummary] = deque(maxlen=keep)
        self.windows = 0
        self.events = 0
        self.purchases = 0
        self.revenue = 0.0

    @property
    def latest(self) -> WindowSummary | None:
        return self.recent[-1] if self.recent else None

    async def write(self, batch: sw.Batch) -> None:
        for summary in batch.values:
            self.recent.append(summary)
            self.windows += 1
            self.events += summary["events"]
            self.purchases += summary["purchases"]
            self.revenue += summary["revenue"]

    def describe(self) -> str:
        return f"SummaryTracker({self.windows} windows)"


def format_summary(summary: WindowSummary, number: int | None = None) -> str:
    """One line describing a window.

    >>> c = enrich({"user": "u1", "page": "/", "ts": 3.0, "action": "view", "amount": "0",
    ...             "currency": "EUR", "ua": "Mozilla"})
    >>> format_summary(summarize([c, c]), 4)
    'window #4: 2 clicks, 0 purchases, EUR 0.00 revenue, 1 users; top pages: / 2'
    """
    label = "window" if number is None else f"window #{number}"
    top = ", ".join(f"{page} {count:,}" for page, count in summary["top_pages"]) or "-"
    return (
        f"{label}: {summary['events']:,} clicks, {summary['purchases']:,} purchases, "
        f"EUR {summary['revenue']:,.2f} revenue, {summary['users']:,} users; top pages: {top}"
    )
