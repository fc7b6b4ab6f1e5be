"""Smaller message fixes of issue 13, item 9: JSON positions, UTF-16 sources, a run whose every
checkpoint is rejected, and ``--help`` defaults."""

from __future__ import annotations

import codecs
import re
import warnings

import pytest

from flows.cli import build_parser
from flows.distill import run_distillation
from rapm_testing.helpers import run_config
from storage.checkpoints import CheckpointStore, CorruptCheckpointWarning
from storage.errors import SourceError
from rapm_core.ingest.sources import read_source
from test_checkpoints import _checkpoint, _flip_byte


def _error(path) -> str:
    with pytest.raises(SourceError) as err:
        list(read_source(path))
    return str(err.value)


@pytest.mark.parametrize("name, text", [("bad.jsonl", '{"prompt": "a red circle}\n'),
                                        ("bad.json", '{"annotations": [{"caption": "a\tb"}]}')],
                         ids=["jsonl", "coco"])
def test_json_errors_name_the_column_once(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    message = _error(path)
    assert " at column " in message and "at at" not in message, message


@pytest.mark.parametrize("bom, codec, name", [(codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
                                             (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
                                             (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32")],
                         ids=["utf-16-le", "utf-16-be", "utf-32-le"])
@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".json"])
def test_a_utf16_source_is_named_as_such(tmp_path, bom, codec, name, suffix):
    # As Windows tools save "Unicode" text: a byte-order mark, then the text.
    text = {".txt": "a red circle\n", ".csv": "prompt\na red circle\n", ".jsonl": '{"prompt": "a red circle"}\n',
            ".json": '{"annotations": [{"caption": "a red circle"}]}'}[suffix]
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(bom + text.encode(codec))
    message = _error(path)
    assert f"is {name}" in message and "re-save it as UTF-8" in message and "not valid UTF-8" not in message


def test_rejecting_every_checkpoint_says_the_run_starts_over(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.load() is None  # no checkpoint at all: nothing to say
    _flip_byte(store.save(_checkpoint(2)))
    _flip_byte(store.save(_checkpoint(4)))
    with pytest.warns(CorruptCheckpointWarning) as caught:
        assert store.load() is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and messages[-1] == (
        f"no valid checkpoint in {store.dir} (2 rejected), starting from iteration 0")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_sd15_dir, make_store):
    return make_store(tmp_path_factory.mktemp("messages-store"), tiny_sd15_dir, num=1)


def test_the_run_loop_logs_that_it_starts_over(tmp_path, store):
    config = run_config(store, tmp_path / "run", iterations=2, checkpoint_every=2)
    run_distillation(config, log=lambda _: None)
    for _, path in CheckpointStore(config.out).steps():
        _flip_byte(path)
    logged: list[str] = []
    run_distillation(config.model_copy(update={"iterations": 3}), log=logged.append)
    assert any(m.startswith("warning: no valid checkpoint") and m.endswith("starting from iteration 0")
               for m in logged), logged


def _subparsers(parser):
    for action in parser._actions:
        if action.choices and hasattr(action, "_name_parser_map"):
            for name, sub in action._name_parser_map.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_help_states_each_default_once():
    twice = []
    for name, sub in _subparsers(build_parser()):
        for action in sub._actions:
            if action.help and len(re.findall(r"\bdefault\b", action.help, re.IGNORECASE)) > 1:
                twice.append(f"rapm {name} {'/'.join(action.option_strings)}: {action.help}")
    assert not twice, "\n".join(twice)
    evaluate = dict(_subparsers(build_parser()))["evaluate"].format_help()
    assert "(default: the one run.json names)" in " ".join(evaluate.split())
