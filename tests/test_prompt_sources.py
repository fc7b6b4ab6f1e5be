"""Prompt ingestion as plain functions: every format, every bad input, the split, idempotency."""

from __future__ import annotations

import json

import pytest

from storage.errors import ConfigMismatchError, SourceError, StoreError
from storage.hashing import config_hash
from rapm_core.ingest.config import IngestConfig
from rapm_core.ingest.engine import ingest_config_hash, ingest_prompts, plan_ingest
from rapm_core.ingest.sources import collect_prompts, read_source
from storage.prompt_store import PromptStore, prompt_id


def write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def ingest_error(tmp_path, name, data, **kw) -> SourceError:
    """Ingest ``data`` saved as ``name`` in a fresh directory; it must fail and leave nothing."""
    case = tmp_path / f"case-{name}"
    case.mkdir()
    src = write(case / name, data)
    with pytest.raises(SourceError) as err:
        ingest_prompts(IngestConfig(source=str(src), out=str(case / "store"), **kw))
    assert [p.name for p in case.iterdir()] == [name], "a failed ingest leaves no store and no temp dirs"
    return err.value


def test_txt_bom_crlf_whitespace_blanks_and_duplicates(tmp_path):
    src = write(tmp_path / "p.txt", b"\xef\xbb\xbfa  red\tcat\r\n\r\n   \r\n a red cat \r\nA red cat\r\nno newline at end")
    plan = ingest_prompts(IngestConfig(source=str(src), out=str(tmp_path / "store"), eval_fraction=0.0))
    assert (plan.counts.read, plan.counts.blank, plan.counts.duplicates, plan.counts.kept) == (6, 2, 1, 3)
    store = PromptStore(tmp_path / "store")
    assert [r.text for r in store.records()] == ["a red cat", "A red cat", "no newline at end"]
    assert [r.id for r in store.records()] == [prompt_id(t) for t in ("a red cat", "A red cat", "no newline at end")]
    assert store.records("eval") == []


def test_csv_default_column_quoted_newline_and_blank_rows(tmp_path):
    src = write(tmp_path / "p.csv", 'id,caption,other\r\n1,"two\r\nlines",x\r\n\r\n2,,y\r\n3,"a, b",z\r\n')
    texts, counts = collect_prompts(read_source(src))
    assert texts == ["two lines", "a, b"]
    assert counts == {"read": 4, "blank": 2, "duplicates": 0}


def test_csv_chosen_column_wins_over_defaults(tmp_path):
    src = write(tmp_path / "p.csv", "prompt,alt\nfirst,second\n")
    assert list(read_source(src, column="alt")) == ["second"]


def test_csv_missing_column_lists_the_columns(tmp_path):
    err = ingest_error(tmp_path, "p.csv", "id,description\n1,x\n")
    assert err.line == 1 and "'id', 'description'" in err.problem and "--column" in err.problem
    err = ingest_error(tmp_path, "q.csv", "id,description\n1,x\n", column="title")
    assert "no column 'title'" in err.problem and "'id', 'description'" in err.problem


def test_csv_short_row_and_broken_quote_name_the_line(tmp_path):
    assert ingest_error(tmp_path, "p.csv", "id,prompt\n1,a\n2\n").line == 3
    err = ingest_error(tmp_path, "q.csv", 'prompt\nok\n"never closed\nmore\n')
    assert err.line == 3 and "malformed CSV" in err.problem


def test_jsonl_field_null_and_blank_lines(tmp_path):
    src = write(tmp_path / "p.jsonl", '{"text": "a cat", "n": 1}\n\n{"text": null}\r\n{"text": "a  cat"}\n{"text": "a dog"}\n')
    texts, counts = collect_prompts(read_source(src))
    assert texts == ["a cat", "a dog"] and counts == {"read": 5, "blank": 2, "duplicates": 1}


def test_jsonl_malformed_line_is_named(tmp_path):
    err = ingest_error(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n')
    assert str(err).startswith(f"{tmp_path / 'case-p.jsonl' / 'p.jsonl'}:2: invalid JSON")


def test_jsonl_missing_or_wrong_field_lists_what_exists(tmp_path):
    err = ingest_error(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"caption": "x", "id": 3}\n')
    assert err.line == 2 and "no field 'prompt'" in err.problem and "'caption', 'id'" in err.problem
    err = ingest_error(tmp_path, "q.jsonl", '{"prompt": 3}\n')
    assert err.line == 1 and "is a int, expected a string" in err.problem
    assert "expected a JSON object" in ingest_error(tmp_path, "r.jsonl", '["a list"]\n').problem


def test_coco_captions(tmp_path):
    doc = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": " A man  riding a horse. "},
                                                  {"image_id": 1, "caption": "A man riding a horse."},
                                                  {"image_id": 2, "caption": "Two dogs."}]}
    src = write(tmp_path / "captions_val.json", json.dumps(doc))
    texts, counts = collect_prompts(read_source(src))
    assert texts == ["A man riding a horse.", "Two dogs."] and counts["duplicates"] == 1


def test_coco_errors_give_json_position_or_annotation(tmp_path):
    err = ingest_error(tmp_path, "c.json", '{"annotations": [\n  {"caption": "x"},\n  {"caption": }\n]}')
    assert err.line == 3 and "invalid JSON" in err.problem and "column 15" in err.problem
    err = ingest_error(tmp_path, "d.json", '{"annotations": [{"caption": "x"}, {"image_id": 4}]}')
    assert "annotations[1] has no 'caption' field" in err.problem and "'image_id'" in err.problem
    err = ingest_error(tmp_path, "e.json", '{"images": []}')
    assert "no 'annotations' list" in err.problem and "'images'" in err.problem


def test_invalid_utf8_names_the_line(tmp_path):
    for name, head in (("p.txt", "ok\n"), ("p.csv", "prompt\nok\n"), ("p.jsonl", '{"prompt": "ok"}\n')):
        err = ingest_error(tmp_path, name, head.encode() + b"caf\xe9 latin-1\n")
        assert err.line == head.count("\n") + 1 and "not valid UTF-8" in err.problem
    assert ingest_error(tmp_path, "c.json", b'{"annotations":\n [{"caption": "caf\xe9"}]}').line == 2


def test_empty_blank_missing_and_unknown_sources(tmp_path):
    assert "empty file" in ingest_error(tmp_path, "e.txt", "").problem
    assert "all 3 entries are blank" in ingest_error(tmp_path, "b.txt", "\n  \r\n\t\n").problem
    assert "no prompts in the file" in ingest_error(tmp_path, "h.csv", "prompt\n").problem
    assert "pass --format" in ingest_error(tmp_path, "p.tsv", "a\tb\n").problem
    assert "not to plain text" in ingest_error(tmp_path, "p.txt", "a\n", column="x").problem
    with pytest.raises(SourceError, match="no such file"):
        plan_ingest(IngestConfig(source=str(tmp_path / "missing.txt"), out=str(tmp_path / "store")))


def test_limit_counts_unique_prompts_in_source_order(tmp_path):
    src = write(tmp_path / "p.txt", "a\na\n\nb\nc\nd\n")
    plan = ingest_prompts(IngestConfig(source=str(src), out=str(tmp_path / "store"), limit=2))
    assert [r.text for r in PromptStore(tmp_path / "store").records()] == ["a", "b"]
    assert (plan.counts.read, plan.counts.blank, plan.counts.duplicates, plan.counts.kept) == (4, 1, 1, 2)


def test_config_hash_is_canonical_and_ignores_out():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1}) != config_hash({"a": 2, "b": [1, 2]})
    a, b = IngestConfig(source="p.txt", out="x"), IngestConfig(source="p.txt", out="y")
    assert ingest_config_hash(a) == ingest_config_hash(b) != ingest_config_hash(IngestConfig(source="p.txt", out="x", seed=1))


def test_meta_records_config_hash_source_and_counts(tmp_path):
    src = write(tmp_path / "p.txt", "a\nb\nb\n")
    config = IngestConfig(source=str(src), out=str(tmp_path / "store"))
    ingest_prompts(config)
    meta = PromptStore(tmp_path / "store").meta
    assert meta["config_hash"] == ingest_config_hash(config) == config_hash(meta["config"])
    assert meta["source"]["format"] == "txt" and len(meta["source"]["sha256"]) == 64
    assert meta["counts"]["read"] == 3 and meta["counts"]["duplicates"] == 1 and meta["count"] == 2


def test_rerun_is_a_noop_and_other_configs_or_contents_are_refused(tmp_path):
    src = write(tmp_path / "p.txt", "a\nb\n")
    config = IngestConfig(source=str(src), out=str(tmp_path / "store"))
    first = ingest_prompts(config)
    stamp = (tmp_path / "store" / "prompts.jsonl").stat().st_mtime_ns
    again = ingest_prompts(config)
    assert again.already_complete and again.counts == first.counts
    assert (tmp_path / "store" / "prompts.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigMismatchError, match=r"eval_fraction: 0\.1 -> 0\.5"):
        ingest_prompts(config.model_copy(update={"eval_fraction": 0.5}))
    write(src, "a\nb\nc\n")
    with pytest.raises(ConfigMismatchError, match="different contents"):
        ingest_prompts(config)
    (tmp_path / "not-a-store").mkdir()
    with pytest.raises(StoreError, match="not a prompt store"):
        ingest_prompts(config.model_copy(update={"out": str(tmp_path / "not-a-store")}))


def test_an_overlong_prompt_is_named_by_file_and_line(tmp_path):
    err = ingest_error(tmp_path, "p.txt", "fine\n" + "x" * 5_000_000 + "\n")
    assert err.line == 2 and "prompt of 5,000,000 characters; prompts are limited to 10,000" in err.problem
    err = ingest_error(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "' + "y" * 20_000 + '"}\n')
    assert err.line == 2 and "20,000 characters" in err.problem


def test_a_prompt_of_only_invisible_characters_is_blank(tmp_path):
    src = write(tmp_path / "p.txt", "\u200b\n\u200b \u2060\ufeff\na\u200bb\n")
    plan = ingest_prompts(IngestConfig(source=str(src), out=str(tmp_path / "store"), eval_fraction=0.0))
    assert (plan.counts.blank, plan.counts.kept) == (2, 1)


def test_coco_annotations_that_are_not_a_list_say_what_they_are(tmp_path):
    err = ingest_error(tmp_path, "captions.json", '{"annotations": {"caption": "a"}}')
    assert "'annotations' is a JSON object, expected a list" in err.problem
