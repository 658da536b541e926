"""Weather cells and WMO codes. Pure.

A cell is ~0.1° square (~11 km north-south): the weather of one cell is the weather of every
store in it, so one forecast serves a town's stores and a country's stores need a few thousand.
"""

from __future__ import annotations

import math

CELL_DEG = 0.1

# contract §3: conditions from WMO weather interpretation codes (WW), as Open-Meteo reports them
_CONDITIONS: dict[int, str] = {
    **dict.fromkeys((0, 1), "clear"), 2: "partly_cloudy", 3: "cloudy",
    **dict.fromkeys((45, 48), "fog"), **dict.fromkeys(range(51, 58), "drizzle"),
    **dict.fromkeys(range(61, 68), "rain"), **dict.fromkeys((*range(71, 78), 85, 86), "snow"),
    **dict.fromkeys(range(80, 83), "showers"), **dict.fromkeys(range(95, 100), "thunderstorm"),
}


def cell_of(lat: float, lon: float) -> str:
    """The cell's name, e.g. "481:115": the same on every instance (a key of the shared cache)."""
    return f"{math.floor(lat / CELL_DEG)}:{math.floor(lon / CELL_DEG)}"


def cell_centre(cell: str) -> tuple[float, float]:
    """Where the cell's weather is asked for: inside [-90, 90] × [-180, 180] even for the cells
    of latitude 90 or longitude 180 (Open-Meteo refuses a whole request for one bad coordinate)."""
    row, col = cell.split(":")
    lat = min(90.0, max(-90.0, (int(row) + 0.5) * CELL_DEG))
    lon = min(180.0, max(-180.0, (int(col) + 0.5) * CELL_DEG))
    return (round(lat, 4), round(lon, 4))


def condition_of(code: int | None) -> str | None:
    """The contract's condition for a WMO code; None (unknown) for codes it does not name."""
    return _CONDITIONS.get(code) if code is not None else None
