"""The adversarial benchmark's own arithmetic and parsing (bench/hostile.py, bench/hostile_watch.py).

No server runs here: these check how the benchmark reads replies, sockets and
the watcher's events, so a wrong number in its report is a failing test.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.support import ROOT

BENCH = ROOT / "bench"


def load(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` as a module (bench/ is not a package)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


hostile = load("hostile")
watch = load("hostile_watch")


def test_netstrings_are_split_and_the_rest_kept() -> None:
    """Complete replies come out in order; a reply cut short stays in the buffer for the next read."""
    replies, rest = watch.parse_netstrings(b"4:OK a,9:ERR - bus,7:DUP")
    assert replies == [b"OK a", b"ERR - bus"]
    assert rest == b"7:DUP"


def test_netstring_without_its_comma_is_garbage() -> None:
    """A reply whose length is not followed by a comma is reported, not silently skipped."""
    with pytest.raises(ValueError):
        watch.parse_netstrings(b"2:OKX")


def test_worst_stall_is_the_longest_gap_between_answers() -> None:
    """The stall counts from the window's start to the first answer, between answers, and to its end."""
    answers = [1.0, 1.1, 1.2, 4.2, 4.3]
    assert hostile.worst_stall(answers, 0.5, 5.0) == pytest.approx(3.0)
    assert hostile.worst_stall(answers, 0.0, 9.3) == pytest.approx(5.0)
    assert hostile.worst_stall([], 2.0, 7.5) == pytest.approx(5.5)


def test_good_client_numbers_fail_on_any_error_and_keep_fresh_frames_out() -> None:
    """One ERR makes the verdict FAIL; a frame sent just before the stop is in flight, not unanswered."""
    data = {
        "frames": [
            [1.0, 1.01, "OK"],
            [1.02, 1.5, "ERR timeout"],
            [1.04, None, None],
            [9.9, None, None],
        ],
        "connects": [[0.5, "ok"]],
        "closes": [],
    }
    n = hostile.good_client_numbers(data, 0.9, 10.0, stop=10.5)
    assert n["outcomes"] == {"OK": 1, "ERR timeout": 1, "unanswered": 1, "in flight at stop": 1}
    assert n["answered_throughout"] is False
    assert n["max_ms"] == pytest.approx(480.0)
    clean = {"frames": [[1.0, 1.01, "OK"], [9.9, None, None]], "connects": [], "closes": []}
    assert hostile.good_client_numbers(clean, 0.9, 10.0, stop=10.5)["answered_throughout"] is True


def test_proc_net_tcp_rows_of_the_server_port() -> None:
    """Only sockets on the server's local port count, the listener left out; states and queues decoded."""
    rows = [
        "0: 0100007F:270F 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
        "1: 0100007F:270F 0A00007F:D431 08 00000000:0000EA60 00:00000000 00000000 0 0 2 1",
        "2: 0100007F:270F 0B00007F:D432 01 00001000:00000000 00:00000000 00000000 0 0 3 1",
        "3: 0100007F:1F90 0B00007F:D433 08 00000000:00000000 00:00000000 00000000 0 0 4 1",
    ]
    assert hostile.parse_proc_net_tcp(rows, 9999) == [
        ("CLOSE_WAIT", 0, 60000),
        ("ESTABLISHED", 4096, 0),
    ]


def test_only_selects_by_name_prefix_and_item() -> None:
    """``--only`` takes names, name prefixes and issue item numbers, and refuses an unknown one."""
    assert [a.name for a in hostile.selected("regex")] == [
        "regex-title-22k",
        "regex-title-64k",
        "regex-body",
    ]
    assert [a.name for a in hostile.selected("2,stats-body")] == ["wedge", "stats-body"]
    with pytest.raises(SystemExit):
        hostile.selected("nonsense")


def test_title_payload_is_exactly_the_largest_frame() -> None:
    """The 64 KiB title attack is exactly the server's --max-length, and has no closing tag."""
    p = hostile.title_payload(hostile.MAX_LENGTH)
    assert (
        len(p) == 65536 and p.startswith(b"<title>ethereum block number ") and b"</title>" not in p
    )
    assert len(hostile.title_payload(None, 1000)) == 22007


def test_reply_text_drops_the_hash_and_keeps_the_code() -> None:
    """Replies are counted by kind and code, a connection-level error marked by its dash."""
    digest = b"ab" * 32
    assert hostile.reply_text(b"OK " + digest) == "OK"
    assert hostile.reply_text(b"ERR " + digest + b" busy") == "ERR busy"
    assert hostile.reply_text(b"ERR - bad-frame") == "ERR - bad-frame"
