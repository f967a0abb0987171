"""The product event contract: what parses, what is refused (always ``InvalidEvent`` naming the field), and
reading catalog files. Pure: nothing is published."""

from __future__ import annotations

import csv
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tagger.errors import InvalidEvent, PermanentError
from tagger.events import MAX_ATTRIBUTES_BYTES, ProductEvent, new_event, parse_event, read_catalog, sku_hint


def created(**fields) -> dict:
    return {"type": "product.created", "sku": "SKU-1", "image": "images/1.jpg", **fields}


def refused(payload, *needles: str) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(payload)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# ---- valid events --------------------------------------------------------------------------------------------


def test_created_event_parses():
    event = parse_event(created(title="Blue shirt", description="Cotton.", brand="Acme",
                                attributes={"baseColour": "Blue", "year": 2010}, id="ev-1"))
    assert isinstance(event, ProductEvent)
    assert (event.type, event.sku, event.image, event.brand, event.id) == (
        "product.created", "SKU-1", "images/1.jpg", "Acme", "ev-1")
    assert event.attributes == {"baseColour": "Blue", "year": 2010}
    assert event.text == "Blue shirt. Cotton."
    assert event.occurred_at is None


def test_updated_event_from_json_text_and_bytes():
    text = json.dumps({"type": "product.updated", "sku": "A-2", "image": "https://cdn.example.com/a.jpg"})
    assert parse_event(text).type == "product.updated"
    assert parse_event(text.encode()).sku == "A-2"
    assert parse_event(bytearray(text.encode())).image == "https://cdn.example.com/a.jpg"


def test_delete_needs_no_image():
    event = parse_event({"type": "product.deleted", "sku": "GONE-1"})
    assert event.type == "product.deleted" and event.image is None and event.title == ""


def test_occurred_at_with_z_is_an_aware_datetime():
    event = parse_event({"type": "product.deleted", "sku": "A", "occurred_at": "2026-11-23T10:00:00Z"})
    assert event.occurred_at == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)
    offset = parse_event({"type": "product.deleted", "sku": "A", "occurred_at": "2026-11-23T12:00:00+02:00"})
    assert offset.occurred_at == event.occurred_at
    naive = parse_event({"type": "product.deleted", "sku": "A", "occurred_at": "2026-11-23T10:00:00"})
    assert naive.occurred_at.tzinfo is not None and naive.occurred_at == event.occurred_at


def test_sql_metacharacters_in_a_sku_are_valid():
    sku = "x'; DROP TABLE products;--"
    event = parse_event(created(sku=sku, title='Robert"); --'))
    assert event.sku == sku


def test_to_message_round_trips():
    event = parse_event(created(occurred_at="2026-11-23T10:00:00Z", attributes={"a": [1, 2]}))
    message = event.to_message()
    assert "brand" not in message  # None left out
    assert json.loads(json.dumps(message)) == message
    assert parse_event(message) == event


# ---- refusals --------------------------------------------------------------------------------------------------


def test_refusals_are_permanent_errors():
    assert issubclass(InvalidEvent, PermanentError)
    with pytest.raises(PermanentError):
        parse_event("{")


def test_malformed_json():
    refused('{"type": "product.deleted", "sku": ', "not valid JSON", "line 1")


@pytest.mark.parametrize("payload, kind", [("[1, 2]", "list"), ("42", "int"), ([{"sku": "A"}], "list"),
                                           ("null", "NoneType"), ('"text"', "str")])
def test_non_object_json(payload, kind):
    refused(payload, "must be a JSON object", kind)


def test_unknown_type():
    refused({"type": "product.exploded", "sku": "A"}, "unknown event type 'product.exploded'", "product.created")


def test_unknown_type_message_is_bounded():
    message = refused({"type": "x" * 100_000, "sku": "A"}, "unknown event type")
    assert len(message) < 500


def test_missing_type():
    refused({"sku": "A"}, "type", "Field required")


def test_missing_sku():
    refused({"type": "product.deleted"}, "sku: Field required")


def test_empty_sku():
    refused({"type": "product.deleted", "sku": ""}, "sku:", "at least 1 character")


@pytest.mark.parametrize("sku", ["AB\x00C", "AB\nC", "AB\tC", " ABC", "ABC ", "AB\x7fC"])
def test_sku_with_control_characters_or_surrounding_spaces(sku):
    refused({"type": "product.deleted", "sku": sku}, "sku:", "control characters")


def test_sku_too_long():
    assert parse_event({"type": "product.deleted", "sku": "A" * 128}).sku == "A" * 128
    refused({"type": "product.deleted", "sku": "A" * 129}, "sku:", "at most 128")


@pytest.mark.parametrize("field, value", [("title", 42), ("description", ["a"]), ("brand", 1.5), ("sku", 123),
                                          ("attributes", ["a", "b"]), ("attributes", "colour=red"),
                                          ("image", 7), ("occurred_at", 1700000000)])
def test_wrong_types(field, value):
    refused(created(**{field: value}), f"{field}:")


def test_unknown_extra_key():
    refused(created(colour="red"), "colour:", "Extra inputs are not permitted")


def test_title_over_1000_characters():
    assert parse_event(created(title="t" * 1000)).title == "t" * 1000
    refused(created(title="t" * 1001), "title:", "at most 1000")


def test_ten_megabyte_title_is_refused_quickly():
    payload = json.dumps(created(title="A" * 10_000_000))
    start = time.perf_counter()
    message = refused(payload, "title:", "at most 1000")
    assert time.perf_counter() - start < 2.0
    assert len(message) < 1000  # the title is not echoed back


def test_nul_in_title():
    refused(created(title="a\x00b"), "title:", "NUL")


def test_created_without_image():
    refused({"type": "product.created", "sku": "A"}, "product.created needs an 'image'")
    refused({"type": "product.updated", "sku": "A", "image": None}, "product.updated needs an 'image'")
    refused(created(image=""), "image:")


def test_attributes_over_64_kb():
    small = {"notes": "x" * (MAX_ATTRIBUTES_BYTES - 100)}
    assert parse_event(created(attributes=small)).attributes == small
    message = refused(created(attributes={"notes": "x" * MAX_ATTRIBUTES_BYTES}), "attributes:", "larger than 65536")
    assert len(message) < 1000


def test_attributes_size_counts_utf8_bytes():
    # 30000 'é' are 60000 bytes + JSON framing: under; 33000 are 66000 bytes: over (though only 33000 characters)
    assert parse_event(created(attributes={"n": "é" * 30_000})).attributes["n"] == "é" * 30_000
    refused(created(attributes={"n": "é" * 33_000}), "attributes:", "larger than")


def test_nul_in_attributes():
    refused(created(attributes={"a": "x\x00y"}), "attributes:", "NUL")


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00Z", "", "23/11/2026"])
def test_bad_occurred_at(value):
    refused({"type": "product.deleted", "sku": "A", "occurred_at": value}, "occurred_at", "ISO 8601")


def test_non_utf8_bytes():
    refused(b'{"type": "product.deleted", "sku": "\xff\xfe"}', "not UTF-8")


def test_every_problem_is_listed():
    message = refused({"type": "product.created", "sku": "", "title": 42, "bogus": 1}, "sku:", "title:", "bogus:")
    assert message.startswith("event does not follow the contract")


# ---- sku_hint / new_event ------------------------------------------------------------------------------------


def test_sku_hint():
    assert sku_hint({"sku": "ABC-1", "type": "nonsense"}) == "ABC-1"
    assert sku_hint({"sku": "A\x00B\nC"}) == "A?B?C"
    assert sku_hint({"sku": "S" * 10_000}) == "S" * 128
    assert sku_hint({"sku": 42}) is None
    assert sku_hint({"sku": ""}) is None
    assert sku_hint({}) is None
    assert sku_hint(["sku"]) is None
    assert sku_hint("not a mapping") is None


def test_new_event_fills_id_and_occurred_at():
    before = datetime.now(UTC)
    event = new_event("product.created", "SKU-9", image="a.jpg", title="T")
    assert event["type"] == "product.created" and event["sku"] == "SKU-9" and event["title"] == "T"
    assert len(event["id"]) == 32 and int(event["id"], 16) >= 0
    occurred = datetime.fromisoformat(event["occurred_at"])
    assert occurred.tzinfo is not None and before <= occurred <= datetime.now(UTC)
    assert new_event("product.deleted", "X")["id"] != new_event("product.deleted", "X")["id"]
    kept = new_event("product.deleted", "X", id="mine", occurred_at="2026-01-01T00:00:00Z")
    assert kept["id"] == "mine" and kept["occurred_at"] == "2026-01-01T00:00:00Z"
    assert parse_event(event).id == event["id"]


# ---- read_catalog --------------------------------------------------------------------------------------------


def test_read_catalog_jsonl(tmp_path):
    path = tmp_path / "catalog.jsonl"
    rows = [
        {"sku": "A-1", "title": "Shirt", "image": "images/a.jpg", "attributes": {"gender": "Men"}, "season": "Fall"},
        {"sku": "A-2", "title": "", "image": "https://cdn.example.com/b.jpg", "brand": None},
        {"sku": "A-3", "image": "/abs/c.jpg", "type": "product.updated"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    events = list(read_catalog(path))
    assert [e["sku"] for e in events] == ["A-1", "A-2", "A-3"]
    assert [e["type"] for e in events] == ["product.created", "product.created", "product.updated"]
    first = events[0]
    assert first["image"] == str((tmp_path / "images" / "a.jpg").resolve())
    assert first["attributes"] == {"season": "Fall", "gender": "Men"}  # unknown column -> attribute
    assert "id" in first and "occurred_at" in first
    assert events[1]["image"] == "https://cdn.example.com/b.jpg"  # URLs untouched
    assert "title" not in events[1] and "brand" not in events[1]  # empty and null values dropped
    assert events[2]["image"] == "/abs/c.jpg"  # absolute paths untouched
    for event in events:
        parse_event(event)  # they satisfy the contract


def test_read_catalog_event_type(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"sku": "A", "image": "a.jpg"}) + "\n")
    assert [e["type"] for e in read_catalog(path, event_type="product.updated")] == ["product.updated"]


def test_read_catalog_csv(tmp_path):
    path = tmp_path / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sku", "title", "image", "baseColour", "year"])
        writer.writeheader()
        writer.writerow({"sku": "C-1", "title": "Red dress", "image": "pics/c1.jpg", "baseColour": "Red",
                         "year": "2012"})
        writer.writerow({"sku": "C-2", "title": "", "image": "pics/c2.jpg", "baseColour": "", "year": ""})
    events = list(read_catalog(path))
    assert [e["sku"] for e in events] == ["C-1", "C-2"]
    assert events[0]["attributes"] == {"baseColour": "Red", "year": "2012"}
    assert events[0]["image"] == str((tmp_path / "pics" / "c1.jpg").resolve())
    assert "attributes" not in events[1] and "title" not in events[1]
    assert parse_event(events[0]).title == "Red dress"


def test_read_catalog_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "catalog.parquet"
    table = pa.table({"sku": ["P-1", "P-2"], "title": ["Watch", None], "image": ["img/p1.jpg", "img/p2.jpg"],
                      "year": [2011, None], "usage": ["Casual", "Sports"]})
    pq.write_table(table, path)
    events = list(read_catalog(path))
    assert [e["sku"] for e in events] == ["P-1", "P-2"]
    assert events[0]["attributes"] == {"year": 2011, "usage": "Casual"}
    assert events[1]["attributes"] == {"usage": "Sports"}
    assert events[1]["image"] == str((tmp_path / "img" / "p2.jpg").resolve())
    assert parse_event(events[0]).attributes["year"] == 2011


def test_read_catalog_json_list(tmp_path):
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps([{"sku": "J-1", "image": "j.jpg"}, {"sku": "J-2", "image": "k.jpg"}]))
    assert [e["sku"] for e in read_catalog(path)] == ["J-1", "J-2"]


@pytest.mark.parametrize("name", ["catalog.xlsx", "catalog.txt", "catalog"])
def test_read_catalog_unknown_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("sku,image\nA,a.jpg\n")
    with pytest.raises(InvalidEvent, match="unknown format"):
        list(read_catalog(path))


def test_read_the_sample_catalog():
    from tagger.settings import REPO_ROOT

    path = REPO_ROOT / "samples" / "catalog" / "catalog.jsonl"
    events = list(read_catalog(path))
    assert len(events) > 10
    first = parse_event(events[0])
    assert Path(first.image).is_absolute() and Path(first.image).is_file()


def test_read_catalog_row_without_sku_is_an_invalid_event(tmp_path):
    from tagger.errors import InvalidEvent
    from tagger.events import read_catalog

    path = tmp_path / "c.csv"
    path.write_text('title,image,attributes\nno sku here,a.jpg,"{""colour"": ""red""}"\n')
    with pytest.raises(InvalidEvent, match="no sku"):
        list(read_catalog(path))
    path.write_text('sku,title,image,attributes,price\nS1,shirt,a.jpg,"{""colour"": ""red""}",10\n')
    (event,) = list(read_catalog(path))
    assert event["attributes"] == {"colour": "red", "price": "10"}
