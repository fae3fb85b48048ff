"""The demo flow: a synthetic clickstream, no servers needed (``sluiceway demo``).

::

    clicks -> enrich -> drop_bots -> is_purchase -+- true --> price -+
                                                  +- false ----------+-> merge
        merge -> window_1s -> summarize -> summaries

``clicks`` is a seeded, rate-paced :class:`~sluiceway.sources.Generator` of click events;
``enrich`` parses the raw fields (amount text to a number in EUR, bot detection from the
user agent); ``drop_bots`` filters the bots out; ``is_purchase`` branches purchases from
page views; ``price`` computes the net revenue of a purchase; the two branches merge again
into the windowing step, which turns every second of clicks into one
:class:`WindowSummary` (top pages, purchases, revenue).

The windowing step lives alone in :func:`window_per_second`, so it can be swapped for a
real event-time tumbling window without touching the rest.

>>> import sluiceway as sw
>>> out = sw.sinks.Collect()
>>> flow = build_demo_flow(rate=100, seed=1, sink=out)
>>> async def stop_after_2s(handle: sw.FlowHandle) -> None:
...     await handle.clock.sleep(2.0)
...     handle.request_stop()
>>> result = sw.run(flow, clock=sw.VirtualClock(), monitor=stop_after_2s)
>>> [s["events"] for s in out.items]  # clicks left after the bot filter, per window
[95, 93]
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
        if rng.random() < _LATE_SHARE:
            ts -= rng.uniform(0.0, _MAX_LATENESS)
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


def summarize(clicks: list[Click]) -> WindowSummary:
    """Add up one window of clicks.

    >>> c = enrich({"user": "u1", "page": "/", "ts": 3.0, "action": "view", "amount": "0",
    ...             "currency": "EUR", "ua": "Mozilla"})
    >>> summarize([c, c])["top_pages"]
    [('/', 2)]
    """
    views = Counter(c["page"] for c in clicks if c["action"] == "view")
    purchases = [c for c in clicks if c["action"] == "purchase"]
    stamps = [c["ts"] for c in clicks]
    return {
        "start": min(stamps, default=0.0),
        "end": max(stamps, default=0.0),
        "events": len(clicks),
        "views": sum(views.values()),
        "purchases": len(purchases),
        "revenue": round(sum(c["revenue"] for c in purchases), 2),
        "users": len({c["user"] for c in clicks}),
        "top_pages": views.most_common(3),
    }


def window_per_second(stream: sw.Stream[Click], *, max_size: int) -> sw.Stream[WindowSummary]:
    """The windowing step: about one second of clicks into one :class:`WindowSummary`.

    For now a processing-time ``batch`` (a list closes one second after its first click,
    or at ``max_size`` clicks).  This is the one place to change when event-time tumbling
    windows arrive: the rest of the demo only sees a stream of summaries.
    """
    windows = stream.batch(max_size, max_delay=1.0, name="window_1s")
    return windows.map(summarize, name="summarize")


def build_demo_flow(
    *,
    rate: float = 2000.0,
    seed: int = 42,
    sink: sw.sinks.Sink | None = None,
    epoch: float = DEFAULT_EPOCH,
) -> sw.Flow:
    """The demo clickstream flow.

    Args:
        rate: clicks per second (on the flow's clock).
        seed: seeds the click generator; the same seed gives the same clicks.
        sink: receives one :class:`WindowSummary` per window (default: printed as JSON
            lines on stdout, so ``sluiceway run sluiceway.demo:build_demo_flow`` works).
        epoch: event time of the first click.
    """
    if not (isinstance(rate, int | float) and rate > 0):
        raise ValueError(f"demo rate must be > 0 clicks/s, got {rate!r}")
    flow = sw.Flow("demo-clickstream")
    source = sw.sources.Generator(
        lambda: generate_clicks(rate=rate, seed=seed, epoch=epoch), rate=rate
    )
    clicks = flow.source(source, name="clicks").map(enrich, name="enrich")
    humans = clicks.filter(_is_human, name="drop_bots")
    purchases, views = humans.branch(_is_purchase, name="is_purchase")
    priced = purchases.map(_price, name="price")
    merged: sw.Stream[Click] = priced.merge(views, name="merge")
    # A one-second list must fit in one batch at the configured rate, with room to spare.
    summaries = window_per_second(merged, max_size=max(1024, math.ceil(rate * 2)))
    summaries.sink(sink if sink is not None else sw.sinks.Stdout(), name="summaries")
    return flow


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
