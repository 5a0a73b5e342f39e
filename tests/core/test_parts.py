"""The resumable-parts primitive: what is done is what is on disk, written whole."""

import json

import pytest

from lpo.core.parts import Parts, RecordLog


def _lines(path):
    return lambda part: part.read_text().split()


def test_parts_done_is_the_union_of_finished_parts_and_todo_keeps_order(tmp_path):
    parts = Parts(tmp_path / "p", "part-*.txt", keys=_lines(tmp_path))
    assert parts.paths() == [] and parts.done() == set()  # no folder yet
    with parts.writing("part-1.txt") as tmp:
        tmp.write_text("a b")
    with parts.writing("part-0.txt") as tmp:
        tmp.write_text("c")
    assert [p.name for p in parts.paths()] == ["part-0.txt", "part-1.txt"]
    assert parts.done() == {"a", "b", "c"}
    assert parts.todo(["d", "a", "e", "c"]) == ["d", "e"]


def test_a_part_cut_short_is_not_done_and_leaves_no_file(tmp_path):
    parts = Parts(tmp_path, "part-*.txt", keys=_lines(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        with parts.writing("part-0.txt") as tmp:
            tmp.write_text("a b")
            raise KeyboardInterrupt  # the job is killed mid-write
    assert parts.done() == set()
    assert list(tmp_path.iterdir()) == []


def test_a_temp_file_of_a_write_in_progress_is_not_a_part(tmp_path):
    parts = Parts(tmp_path, "*.json")  # the demo's stages: one part per stage, named by it
    with parts.writing("lpo.json") as tmp:
        tmp.write_text("{}")
        assert parts.done() == set()  # the temp file beside it does not count while it is written
    assert parts.done() == {"lpo"}


def test_a_name_the_pattern_would_not_find_is_refused(tmp_path):
    parts = Parts(tmp_path, "part-*.parquet")
    with pytest.raises(ValueError, match="does not match"):
        with parts.writing("scores-0.parquet"):
            pass


def test_record_log_drops_a_torn_last_line_and_the_next_append_starts_a_line(tmp_path):
    log = RecordLog(tmp_path / "scores.jsonl")
    with log.appending() as append:
        append([{"key": "a", "score": 1.0}, {"key": "b", "score": 2.0}])
    with open(log.path, "a") as handle:
        handle.write('{"key": "c", "sco')  # a write cut short by a kill
    assert log.done() == {"a", "b"}
    assert log.path.read_text().endswith('"score": 2.0}\n')  # rewritten without the torn line
    with log.appending() as append:
        append([{"key": "c", "score": 3.0}])
    assert [json.loads(line)["key"] for line in log.path.read_text().splitlines()] == ["a", "b", "c"]
    assert log.todo(["c", "d", "a"]) == ["d"]


def test_record_log_torn_line_without_the_repair_would_glue_the_next_record(tmp_path):
    """What the repair prevents: appending after a torn line (no newline) makes the next record unreadable too."""
    path = tmp_path / "scores.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b", "sc')
    with open(path, "a") as handle:  # the append before the primitive existed
        handle.write(json.dumps({"key": "c"}) + "\n")
    assert RecordLog(path).done() == {"a"}  # c is lost with the torn b
    path.write_text('{"key": "a"}\n{"key": "b", "sc')
    with RecordLog(path).appending() as append:
        append([{"key": "c"}])
    assert RecordLog(path).done() == {"a", "c"}


def test_record_log_last_record_of_a_key_wins_and_a_record_needs_its_key(tmp_path):
    log = RecordLog(tmp_path / "log.jsonl", key="uid")
    with log.appending() as append:
        append([{"uid": 1, "v": "old"}, {"uid": 1, "v": "new"}])
        with pytest.raises(ValueError, match="needs 'uid'"):
            append([{"v": "no key"}])
    assert log.records() == {1: {"uid": 1, "v": "new"}}
