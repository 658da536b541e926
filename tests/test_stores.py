"""The stores loader against real OSM exports as they are, and against bad input (contract §2)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import shapely

from geopush.errors import Problem, StoreLoadError
from geopush.geo.hours import HoursSyntaxError, StoreHours
from geopush.geo.stores import Geofence, StoreSet, load_stores, parse_stores
from geopush.timeutil import parse_ts

FIXTURES = Path(__file__).parent / "fixtures"
BLED = FIXTURES / "bled_supermarkets.geojson"
PARIS = FIXTURES / "paris_supermarkets_2014.geojson"
LIDL = FIXTURES / "germany_lidl_centers_slice.geojson"
REPO_STORES = Path(__file__).parent.parent / "stores.geojson"


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _by_id(stores: StoreSet) -> dict[str, Geofence]:
    return {g.id: g for g in stores.geofences}


@pytest.fixture(scope="module")
def bled() -> StoreSet:
    return load_stores(BLED)


@pytest.fixture(scope="module")
def paris() -> StoreSet:
    return load_stores(PARIS)


@pytest.fixture(scope="module")
def lidl() -> StoreSet:
    return load_stores(LIDL)


# -- real exports, as they are --------------------------------------------------------------


def test_bled_export_loads_points_and_polygons(bled: StoreSet) -> None:
    assert len(bled) == 30
    assert Counter(g.kind for g in bled.geofences) == {"circle": 21, "polygon": 9}
    assert bled.warnings == ()
    hofer = _by_id(bled)["way/281804082"]
    assert hofer.kind == "polygon" and hofer.polygon is not None
    assert hofer.name == "Hofer - Lesce"
    assert hofer.tags == ("shop:supermarket", "operator:Hofer Slovenija")
    assert hofer.radius_m == 0.0  # buffer_m default
    assert hofer.store_id == "way/281804082"  # store_id defaults to the geofence id
    assert hofer.polygon.contains(shapely.Point(hofer.lon, hofer.lat))
    assert {g.timezone for g in bled.geofences} == {"Europe/Ljubljana"}


def test_the_repo_sample_is_the_bled_export() -> None:
    sample = load_stores(REPO_STORES)
    assert len(sample) == 30 and sample.warnings == ()


def test_point_radius_defaults_to_the_configured_default(bled: StoreSet) -> None:
    node = _by_id(bled)["node/90554825"]
    assert node.kind == "circle" and node.radius_m == 100.0
    wider = _by_id(load_stores(BLED, default_radius_m=250.0))["node/90554825"]
    assert wider.radius_m == 250.0


def test_name_falls_back_to_brand_operator_then_id(bled: StoreSet) -> None:
    fences = _by_id(bled)
    assert fences["node/1800516576"].name == "node/1800516576"  # no name, brand nor operator
    text = _collection(
        _point("a", brand="Lidl", operator="Lidl Vertriebs-GmbH"),
        _point("b", operator="Hofer Slovenija", lon=14.1),
    )
    stores, _ = parse_stores(text)
    assert stores is not None
    assert [g.name for g in stores.geofences] == ["Lidl", "Hofer Slovenija"]


def test_paris_export_merges_the_repeated_node_and_warns_on_french_hours(paris: StoreSet) -> None:
    # 598 features, one node repeated by overpass-turbo with the same geometry
    assert len(paris) == 597
    assert Counter(g.kind for g in paris.geofences) == {"circle": 567, "polygon": 30}
    assert {g.timezone for g in paris.geofences} == {"Europe/Paris"}
    merged = [w for w in paris.warnings if "merged" in w.message]
    assert len(merged) == 1
    assert "feature #597" in merged[0].where and "node/2519923502" in merged[0].where
    assert "feature #550" in merged[0].message
    # the first of the repeats wins: it carries the properties, the repeat has only @id
    assert _by_id(paris)["node/2519923502"].name == "Le Panier Gourmet - Franprix"

    french = [w for w in paris.warnings if w.value == "Lu-Sam 10:00-21:00"]
    assert [w.where.split(": ")[1] for w in french] == [
        "feature #2 (id 'way/54040540')", "feature #550 (id 'node/2519923502')",
    ]
    assert all(w.field == "opening_hours" and "hours unknown" in w.message for w in french)
    assert french[0].where.startswith(f"{PARIS}:222")  # the line where the feature starts
    assert _by_id(paris)["way/54040540"].hours is None


def test_lidl_export_has_brand_tags_hours_and_berlin_time(lidl: StoreSet) -> None:
    assert len(lidl) == 305
    assert {g.kind for g in lidl.geofences} == {"circle"}
    assert {g.timezone for g in lidl.geofences} == {"Europe/Berlin"}
    first = _by_id(lidl)["node/16257496"]
    assert first.tags == ("shop:supermarket", "brand:Lidl")
    assert first.hours is not None and first.hours.expression == "Mo-Sa 07:00-22:00; Su,PH off"
    # five features of the export have opening_hours the OSM syntax does not allow
    bad_hours = {w.value for w in lidl.warnings if w.field == "opening_hours"}
    assert bad_hours == {"Mo-Sa 07:00-22:00; ", "Occasional", "Mo-Sa 08:00-21:00, Ph off",
                         "dauerhaft geschlossen", "Mo-Sa 21:00"}


def test_every_other_property_reaches_templates(lidl: StoreSet) -> None:
    props = _by_id(lidl)["node/16257496"].properties
    assert props["addr:street"] == "Mannheimer Straße"
    assert props["store_id"] == "node/16257496" and props["name"] == "Lidl"
    assert props["tags"] == ["shop:supermarket", "brand:Lidl"]
    assert props["timezone"] == "Europe/Berlin"


# -- ids, tags, store_id, timezone ------------------------------------------------------------


def _point(fid: str | None = None, *, lon: float = 14.0, lat: float = 46.36, where: str = "props",
           **props: Any) -> dict[str, Any]:
    feature: dict[str, Any] = {"type": "Feature", "properties": dict(props),
                               "geometry": {"type": "Point", "coordinates": [lon, lat]}}
    if fid is not None:
        if where == "feature":
            feature["id"] = fid
        elif where == "props":
            feature["properties"]["id"] = fid
        else:
            feature["properties"]["@id"] = fid
    return feature


def _collection(*features: Any) -> str:
    return json.dumps({"type": "FeatureCollection", "features": list(features)}, indent=1)


@pytest.mark.parametrize("where", ["feature", "props", "@id"])
def test_id_comes_from_feature_id_properties_id_or_at_id(where: str) -> None:
    stores, report = parse_stores(_collection(_point("node/1", where=where)))
    assert stores is not None, report.problems
    assert stores.geofences[0].id == "node/1"


def test_feature_id_wins_and_a_null_id_does_not_hide_at_id() -> None:
    feature = _point("node/2", where="@id")
    feature["id"] = "custom-1"
    stores, _ = parse_stores(_collection(feature))
    assert stores is not None and stores.geofences[0].id == "custom-1"
    feature["id"] = None
    stores, _ = parse_stores(_collection(feature))
    assert stores is not None and stores.geofences[0].id == "node/2"


def test_numeric_feature_id_is_accepted_as_text() -> None:
    stores, _ = parse_stores(_collection(_point(None) | {"id": 42}))
    assert stores is not None and stores.geofences[0].id == "42"


def test_given_tags_come_first_then_osm_tags_split_on_semicolons() -> None:
    feature = _point("n1", tags=["promo", "shop:supermarket"], shop="supermarket",
                     amenity="ice_cream", cuisine="ice_cream;coffee_shop", brand="Lidl",
                     operator="Lidl; Co")
    stores, _ = parse_stores(_collection(feature))
    assert stores is not None
    assert stores.geofences[0].tags == (
        "promo", "shop:supermarket", "amenity:ice_cream", "cuisine:ice_cream",
        "cuisine:coffee_shop", "brand:Lidl", "operator:Lidl; Co",
    )


def test_store_id_groups_geofences_and_radius_buffer_are_taken() -> None:
    square = [[14.0, 46.0], [14.001, 46.0], [14.001, 46.001], [14.0, 46.001], [14.0, 46.0]]
    text = _collection(
        _point("entrance", store_id="store-7", radius_m=40),
        {"type": "Feature", "id": "parking", "properties": {"store_id": "store-7", "buffer_m": 15},
         "geometry": {"type": "Polygon", "coordinates": [square]}},
    )
    stores, report = parse_stores(text)
    assert stores is not None, report.problems
    entrance, parking = stores.geofences
    assert (entrance.store_id, entrance.radius_m) == ("store-7", 40.0)
    assert (parking.store_id, parking.radius_m, parking.kind) == ("store-7", 15.0, "polygon")


def test_multipolygon_loads() -> None:
    a = [[14.0, 46.0], [14.001, 46.0], [14.001, 46.001], [14.0, 46.0]]
    b = [[14.01, 46.0], [14.011, 46.0], [14.011, 46.001], [14.01, 46.0]]
    feature = {"type": "Feature", "id": "m", "properties": {},
               "geometry": {"type": "MultiPolygon", "coordinates": [[a], [b]]}}
    stores, report = parse_stores(_collection(feature))
    assert stores is not None, report.problems
    assert stores.geofences[0].polygon is not None
    assert stores.geofences[0].polygon.geom_type == "MultiPolygon"


@pytest.mark.parametrize(
    ("lon", "lat", "zone"),
    [(14.1, 46.37, "Europe/Ljubljana"), (2.35, 48.86, "Europe/Paris"),
     (13.40, 52.52, "Europe/Berlin"), (-73.99, 40.73, "America/New_York")],
)
def test_timezone_is_derived_from_the_coordinates(lon: float, lat: float, zone: str) -> None:
    stores, _ = parse_stores(_collection(_point("n", lon=lon, lat=lat)))
    assert stores is not None and stores.geofences[0].timezone == zone


def test_explicit_timezone_is_kept_when_valid() -> None:
    stores, _ = parse_stores(_collection(_point("n", timezone="Europe/Vienna")))
    assert stores is not None and stores.geofences[0].timezone == "Europe/Vienna"


# -- opening hours ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidl_hours(lidl: StoreSet) -> StoreHours:
    hours = _by_id(lidl)["node/16257496"].hours  # Mannheim: Mo-Sa 07:00-22:00; Su,PH off
    assert hours is not None
    return hours


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        ("2026-06-01T07:30:00+02:00", True),  # Monday, half an hour after opening
        ("2026-06-01T06:30:00+02:00", False),  # before opening
        ("2026-06-01T22:00:00+02:00", False),  # closing time
        ("2026-05-31T12:00:00+02:00", False),  # Sunday
        ("2026-05-25T12:00:00+02:00", False),  # Whit Monday, a public holiday: PH off
        ("2026-12-25T12:00:00+01:00", False),  # Christmas Day, a Friday
        ("2026-12-23T12:00:00+01:00", True),  # an ordinary Wednesday in winter time
    ],
)
def test_is_open_in_the_store_time_zone(lidl_hours: StoreHours, moment: str,
                                        expected: bool) -> None:
    assert lidl_hours.is_open(_epoch(moment)) is expected


def test_is_open_for_at_least_looks_ahead(lidl_hours: StoreHours) -> None:
    assert lidl_hours.is_open(_epoch("2026-06-01T21:40:00+02:00"), for_at_least_s=900) is True
    assert lidl_hours.is_open(_epoch("2026-06-01T21:50:00+02:00"), for_at_least_s=900) is False
    assert lidl_hours.is_open(_epoch("2026-06-01T21:50:00+02:00")) is True


def test_is_open_for_at_least_walks_past_changes_that_stay_open() -> None:
    split = StoreHours.parse("Mo-Su 08:00-12:00,12:00-18:00", "Europe/Berlin", 52.5, 13.4)
    assert split.is_open(_epoch("2026-06-01T11:55:00+02:00"), for_at_least_s=900) is True
    lunch = StoreHours.parse("Mo-Su 08:00-12:00,12:10-18:00", "Europe/Berlin", 52.5, 13.4)
    assert lunch.is_open(_epoch("2026-06-01T11:55:00+02:00"), for_at_least_s=900) is False


def test_unknown_hours_are_none_and_24_7_is_always_open() -> None:
    unknown = StoreHours.parse("Mo-Fr 08:00-12:00 unknown", "Europe/Berlin", 52.5, 13.4)
    assert unknown.is_open(_epoch("2026-06-01T10:00:00+02:00")) is None
    always = StoreHours.parse("24/7", "Europe/Berlin", 52.5, 13.4)
    assert always.is_open(_epoch("2026-12-25T03:00:00+01:00"), for_at_least_s=3600) is True


def test_bad_hours_raise_a_syntax_error_with_the_position() -> None:
    with pytest.raises(HoursSyntaxError, match="1:1"):
        StoreHours.parse("Lu-Sam 10:00-21:00", "Europe/Paris", 48.86, 2.35)


def test_non_text_opening_hours_is_a_warning_not_a_crash() -> None:
    stores, report = parse_stores(_collection(_point("n", opening_hours=8)))
    assert stores is not None and stores.geofences[0].hours is None
    assert [w.field for w in report.warnings] == ["opening_hours"]


# -- bad input: every error names feature index, id, field and value ----------------------------


def _errors(text: str) -> list[Problem]:
    stores, report = parse_stores(text, source="stores.geojson")
    assert stores is None
    assert report.errors
    return report.errors


def test_malformed_json_names_the_line() -> None:
    [error] = _errors('{"type": "FeatureCollection",\n "features": [\n  {"type": }\n]}')
    assert error.where == "stores.geojson:3"
    assert "not valid JSON" in error.message


def test_not_a_feature_collection() -> None:
    [error] = _errors(json.dumps({"type": "Feature", "geometry": None}))
    assert (error.field, error.value, error.expected) == ("type", "Feature", "FeatureCollection")


def test_an_empty_collection_loads_with_a_warning() -> None:
    stores, report = parse_stores(_collection(), source="stores.geojson")
    assert stores is not None and len(stores) == 0
    assert [(w.where, w.field) for w in report.warnings] == [("stores.geojson:1", "features")]


def test_features_must_be_a_list() -> None:
    [error] = _errors(json.dumps({"type": "FeatureCollection", "features": {}}))
    assert error.field == "features"


BAD_FEATURES: list[tuple[str, dict[str, Any], str, Any]] = [
    ("unknown geometry type",
     {"type": "Feature", "id": "x", "properties": {},
      "geometry": {"type": "LineString", "coordinates": [[14, 46], [14.1, 46]]}},
     "geometry.type", "LineString"),
    ("no geometry", {"type": "Feature", "id": "x", "properties": {}, "geometry": None},
     "geometry", None),
    ("latitude out of range", _point("x", lon=46.36, lat=140.0), "geometry.coordinates", 140.0),
    ("longitude out of range", _point("x", lon=-200.0), "geometry.coordinates", -200.0),
    ("coordinates not numbers",
     {"type": "Feature", "id": "x", "properties": {},
      "geometry": {"type": "Point", "coordinates": ["14", "46"]}},
     "geometry.coordinates", '["14", "46"]'),
    ("unclosed ring",
     {"type": "Feature", "id": "x", "properties": {},
      "geometry": {"type": "Polygon",
                   "coordinates": [[[14, 46], [14.1, 46], [14.1, 46.1], [14, 46.1]]]}},
     "geometry.coordinates[0]", [(14.0, 46.0), (14.0, 46.1)]),
    ("negative radius", _point("x", radius_m=-5), "radius_m", -5),
    ("zero radius", _point("x", radius_m=0), "radius_m", 0),
    ("radius not a number", _point("x", radius_m="50m"), "radius_m", "50m"),
    ("negative buffer",
     {"type": "Feature", "id": "x", "properties": {"buffer_m": -1},
      "geometry": {"type": "Polygon",
                   "coordinates": [[[14, 46], [14.1, 46], [14.1, 46.1], [14, 46]]]}},
     "buffer_m", -1),
    ("tags not a list", _point("x", tags="shop:supermarket"), "tags", "shop:supermarket"),
    ("tags not strings", _point("x", tags=["a", 3]), "tags", '["a", 3]'),
    ("bad timezone", _point("x", timezone="Europe/Atlantis"), "timezone", "Europe/Atlantis"),
    ("store_id not text", _point("x", store_id=["a"]), "store_id", '["a"]'),
    ("id of the wrong type", _point(None) | {"id": {"osm": 1}}, "id", '{"osm": 1}'),
]


@pytest.mark.parametrize(("case", "feature", "field", "value"), BAD_FEATURES,
                         ids=[c[0] for c in BAD_FEATURES])
def test_bad_feature_error_names_index_id_field_value_and_line(
    case: str, feature: dict[str, Any], field: str, value: Any
) -> None:
    text = _collection(_point("good-1"), feature)
    errors = _errors(text)
    assert len(errors) == 1, errors
    [error] = errors
    assert error.field == field
    assert error.value == value
    assert error.expected
    assert "feature #1" in error.where
    if case != "id of the wrong type":
        assert "(id 'x')" in error.where
    line = _line_of_feature(text, 1)
    assert error.where.startswith(f"stores.geojson:{line}: ")


def _line_of_feature(text: str, index: int) -> int:
    """1-based line of the index-th `{"type": "Feature"` object in json.dumps(indent=1)."""
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    return starts[index]


def test_missing_id_names_the_index() -> None:
    [error] = _errors(_collection(_point("good"), _point(None)))
    assert error.field == "id" and error.value is None
    assert "feature #1" in error.where and "missing" in error.message


def test_duplicate_id_with_a_different_geometry_is_an_error() -> None:
    [error] = _errors(_collection(_point("dup"), _point("dup", lon=14.2)))
    assert error.field == "id" and error.value == "dup"
    assert "feature #1 (id 'dup')" in error.where and "feature #0" in error.message


def test_duplicate_id_with_the_same_geometry_is_merged_with_a_warning() -> None:
    stores, report = parse_stores(_collection(_point("dup", name="A"), _point("dup")))
    assert stores is not None and len(stores) == 1 and stores.geofences[0].name == "A"
    [warning] = report.warnings
    assert warning.field == "id" and "merged" in warning.message


def test_every_error_of_a_file_is_listed_not_only_the_first() -> None:
    errors = _errors(_collection(_point(None), _point("a", radius_m=-1),
                                 _point("b", timezone="Nowhere/City"), _point("ok")))
    assert [e.field for e in errors] == ["id", "radius_m", "timezone"]
    assert all(f"feature #{i}" in e.where for i, e in enumerate(errors))


def test_load_stores_raises_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "stores.geojson"
    path.write_text(_collection(_point("a", radius_m=-1), _point("b", radius_m=-2)))
    with pytest.raises(StoreLoadError) as raised:
        load_stores(path)
    assert "2 error(s)" in raised.value.message
    assert [p.value for p in raised.value.details] == [-1, -2]
    assert str(path) in raised.value.details[0].where


def test_unreadable_file_is_a_store_load_error(tmp_path: Path) -> None:
    with pytest.raises(StoreLoadError, match="cannot read stores file"):
        load_stores(tmp_path / "missing.geojson")


def test_stores_sharing_an_expression_share_its_parse_but_not_their_holidays() -> None:
    """A chain's thousands of stores with one opening_hours parse it once (load time); where
    the place matters (public holidays, the sun's times) each keeps its own."""
    paris = StoreHours.parse("Mo-Sa 08:00-20:00", "Europe/Paris", 48.85, 2.35)
    marseille = StoreHours.parse("Mo-Sa 08:00-20:00", "Europe/Paris", 43.30, 5.40)
    assert paris._parsed is marseille._parsed
    # 8 May 2026, a Friday: a public holiday in France, not in Germany
    friday = parse_ts("2026-05-08T10:00:00Z")
    in_paris = StoreHours.parse("Mo-Sa 08:00-20:00; PH off", "Europe/Paris", 48.85, 2.35)
    in_berlin = StoreHours.parse("Mo-Sa 08:00-20:00; PH off", "Europe/Berlin", 52.52, 13.40)
    assert (in_paris.is_open(friday), in_berlin.is_open(friday)) == (False, True)
    at_dusk = StoreHours.parse("sunset-23:00", "Europe/Paris", 48.85, 2.35)
    assert at_dusk._parsed is not StoreHours.parse("sunset-23:00", "Europe/Paris", 43.30,
                                                   5.40)._parsed
