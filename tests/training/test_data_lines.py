"""JSONL lines end at "\\n" only; undecodable or over-deep lines are reported by number, never a traceback."""
import json

from clusterctl.training import data

GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def line(content: str) -> bytes:
    return json.dumps([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}],
                      ensure_ascii=False).encode()


def test_unicode_line_separators_inside_strings_are_content(tmp_path):
    """U+2028, U+2029 and U+0085 are valid unescaped in JSON strings: they neither split nor shift lines."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join([line("a\u2028b"), line("c\u2029d"), line("e\u0085f"), b"not json", b""]))
    records = data.read_records(path)
    assert [r.where for r in records] == ["line 1", "line 2", "line 3", "line 4"]
    assert [r.messages[0]["content"] for r in records[:3]] == ["a\u2028b", "c\u2029d", "e\u0085f"]
    assert records[3].error.startswith("not JSON")


def test_invalid_utf8_and_deep_nesting_are_reported_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), b'[{"role": "user", "content": "\xff"}]', deep,
                                 b"\r", line("crlf") + b"\r"]))
    records = data.read_records(path)
    assert [(r.where, r.error) for r in records] == [
        ("line 1", None),
        ("line 2", "not UTF-8: byte 31 of the line (0xff) cannot be decoded (save the file as UTF-8)"),
        ("line 3", "not a conversation: JSON nested too deeply"),
        ("line 5", None)]


def test_a_deeply_nested_array_file_is_not_a_traceback(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert [(r.where, r.error) for r in data.read_records(path)] == [
        ("line 1", "not a conversation: JSON nested too deeply")]
