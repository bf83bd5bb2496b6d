"""What a fleet costs a day against what the same notes cost on a hosted API
(docs/capacity.md "The cost model": every default below is cited there).

A machine costs its price spread over `amortize_months` (or its rent), its power at
`power_w` around the clock, and its hosting; a node is one machine, a node group (a
profile's [group]) all of its machines, each priced alike; the API costs its list price per million
input and output tokens. Break-even is the volume at which the API's bill equals the
fleet's (a fleet's cost does not fall with volume; the API's does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cluster.capacity.profile import Profile

DAYS_PER_MONTH = 365.25 / 12
# The field report (shared/background/field-report.txt): 6,000 notes/day, ~3M input and
# ~1.5M output tokens a day; GPT-4o ~$45/day; self-hosted Qwen 72B on rented A100s ~$28/day;
# Mac Studios cheaper "over a 2-year horizon".
REPORT_INPUT_TOKENS_DAY = 3_000_000
REPORT_OUTPUT_TOKENS_DAY = 1_500_000
REPORT_API_USD_DAY = 45.0
REPORT_RENTED_A100_USD_DAY = 28.0
REPORT_BREAK_EVEN_NOTES = 2000
DEFAULT_AMORTIZE_MONTHS = 24.0
# GPT-4o's list prices are $2.50 / $10.00 per 1M input / output tokens (openai.com/api/pricing).
# The report's $45/day for 3M + 1.5M tokens is twice that; the defaults keep GPT-4o's 1:4
# input:output ratio and reproduce the report: 3 x $5 + 1.5 x $20 = $45.
DEFAULT_API_USD_PER_M_INPUT = 5.0
DEFAULT_API_USD_PER_M_OUTPUT = 20.0
LIST_API_USD_PER_M_INPUT = 2.5
LIST_API_USD_PER_M_OUTPUT = 10.0
# US average retail price of electricity to commercial customers, 2024: ~13 cents/kWh
# (EIA Electric Power Monthly, table 5.6.A).
DEFAULT_USD_PER_KWH = 0.13


@dataclass(frozen=True)
class NodeCost:
    """One node's costs; None = not known (counted as 0 and reported as missing). The prices
    are per machine; a node group of `machines` machines costs that many times each part."""

    node_cost_usd: float | None = None
    amortize_months: float = DEFAULT_AMORTIZE_MONTHS
    power_w: float | None = None
    usd_per_kwh: float = DEFAULT_USD_PER_KWH
    hosting_usd_month: float = 0.0
    rent_usd_hour: float | None = None
    machines: int = 1

    @property
    def priced(self) -> bool:
        return self.node_cost_usd is not None or self.rent_usd_hour is not None

    def per_day(self) -> dict[str, float]:
        """$/day by part: capital (or rent), power, hosting; every machine of a group counted."""
        k = self.machines
        capital = k * (self.node_cost_usd or 0.0) / (self.amortize_months * DAYS_PER_MONTH)
        rent = k * (self.rent_usd_hour or 0.0) * 24.0
        power = k * (self.power_w or 0.0) / 1000.0 * 24.0 * self.usd_per_kwh
        hosting = k * self.hosting_usd_month / DAYS_PER_MONTH
        return {
            "capital": capital,
            "rent": rent,
            "power": power,
            "hosting": hosting,
            "total": capital + rent + power + hosting,
        }


def node_cost(
    profile: Profile,
    *,
    node_cost_usd: float | None = None,
    amortize_months: float | None = None,
    power_w: float | None = None,
    usd_per_kwh: float | None = None,
    hosting_usd_month: float | None = None,
    rent_usd_hour: float | None = None,
) -> NodeCost:
    """The profile's [cost] table (if any) with the given flags over it; prices are per machine,
    and a node group's profile counts its `machines`."""
    base = profile.cost
    c = NodeCost(machines=profile.machines)
    if base is not None:
        c = replace(
            c,
            node_cost_usd=base.node_cost_usd,
            power_w=base.power_w,
            rent_usd_hour=base.rent_usd_hour,
            amortize_months=base.amortize_months or c.amortize_months,
            hosting_usd_month=base.hosting_usd_month or 0.0,
        )
    overrides = {
        "node_cost_usd": node_cost_usd,
        "amortize_months": amortize_months,
        "power_w": power_w,
        "usd_per_kwh": usd_per_kwh,
        "hosting_usd_month": hosting_usd_month,
        "rent_usd_hour": rent_usd_hour,
    }
    c = replace(c, **{k: v for k, v in overrides.items() if v is not None})
    if node_cost_usd is not None and rent_usd_hour is None:
        c = replace(
            c, rent_usd_hour=None
        )  # a price given on the command line replaces a profile's rent
    elif rent_usd_hour is not None and node_cost_usd is None:
        c = replace(c, node_cost_usd=None)
    return c


@dataclass(frozen=True)
class ApiPrice:
    usd_per_m_input: float = DEFAULT_API_USD_PER_M_INPUT
    usd_per_m_output: float = DEFAULT_API_USD_PER_M_OUTPUT

    def per_note(self, prompt_tokens: float, output_tokens: float) -> float:
        return (prompt_tokens * self.usd_per_m_input + output_tokens * self.usd_per_m_output) / 1e6


@dataclass(frozen=True)
class CostReport:
    fleet_usd_day: float
    fleet_parts: dict[str, float]
    usd_per_1000_notes: float
    api_usd_day: float
    api_usd_per_1000_notes: float
    break_even_notes_day: float | None  # None when a node has no price, inf when the API is free
    missing: tuple[str, ...]  # what was not priced (counted as 0)

    def as_dict(self) -> dict:
        return {
            "fleet_usd_day": self.fleet_usd_day,
            "fleet_usd_day_parts": self.fleet_parts,
            "fleet_usd_per_1000_notes": self.usd_per_1000_notes,
            "api_usd_day": self.api_usd_day,
            "api_usd_per_1000_notes": self.api_usd_per_1000_notes,
            "break_even_notes_day": (
                None
                if self.break_even_notes_day is None or math.isinf(self.break_even_notes_day)
                else self.break_even_notes_day
            ),
            "not_priced": list(self.missing),
        }


def fleet_costs(
    nodes: Sequence[tuple[str, NodeCost, int]],
    *,
    notes_per_day: float,
    prompt_tokens: float,
    output_tokens: float,
    api: ApiPrice,
) -> CostReport:
    """Costs of a fleet of (profile name, NodeCost, count) at `notes_per_day` notes of the given mean size."""
    parts = {"capital": 0.0, "rent": 0.0, "power": 0.0, "hosting": 0.0}
    missing = []
    unpriced = False
    for name, cost, count in nodes:
        day = cost.per_day()
        for k in parts:
            parts[k] += day[k] * count
        if not cost.priced:
            unpriced = True
            missing.append(
                f"{name}: no node price (--node-cost-usd or --rent-usd-hour, or [cost] in the profile)"
            )
        if cost.power_w is None and cost.rent_usd_hour is None:
            missing.append(f"{name}: no power draw (--power-w, or [cost] power_w in the profile)")
    total = sum(parts.values())
    per_note_api = api.per_note(prompt_tokens, output_tokens)
    return CostReport(
        fleet_usd_day=total,
        fleet_parts=parts,
        usd_per_1000_notes=1000.0 * total / notes_per_day,
        api_usd_day=per_note_api * notes_per_day,
        api_usd_per_1000_notes=1000.0 * per_note_api,
        break_even_notes_day=(
            None if unpriced else total / per_note_api if per_note_api > 0 else math.inf
        ),
        missing=tuple(missing),
    )


def report_api_usd_day(api: ApiPrice) -> float:
    """The API's bill at the field report's token volume (3M input + 1.5M output a day)."""
    return (
        REPORT_INPUT_TOKENS_DAY * api.usd_per_m_input
        + REPORT_OUTPUT_TOKENS_DAY * api.usd_per_m_output
    ) / 1e6
