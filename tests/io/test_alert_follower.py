"""The alert-file follower: new lines only, partial lines, rotation, truncation, late files, asyncio."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mproxy.io.alerts import AlertFollower, FileTail


def test_tail_from_end_partial_lines_and_truncation(tmp_path: Path) -> None:
    p = tmp_path / "eve.json"
    p.write_text("old 1\nold 2\n")
    t = FileTail(str(p))
    assert t.poll() == []  # existing lines are history
    with p.open("a") as f:
        f.write("new 1\nnew ")
    assert t.poll() == [b"new 1"]
    with p.open("a") as f:
        f.write("2\n\n")
    assert t.poll() == [b"new 2"]
    p.write_text("after truncation\n")  # copytruncate / the IDS rewrote the file
    assert t.poll() == [b"after truncation"] and t.truncations == 1


def test_rotation_reads_the_rest_of_the_old_file_then_the_new_one(tmp_path: Path) -> None:
    p = tmp_path / "alert_json.txt"
    p.write_text("")
    t = FileTail(str(p))
    t.poll()
    with p.open("a") as f:
        f.write("a\n")
    assert t.poll() == [b"a"]
    with p.open("a") as f:
        f.write("b\n")  # written just before the rotation, not yet read
    os.rename(p, tmp_path / "alert_json.txt.1")
    assert t.poll() == [b"b"]  # the path is gone for a moment: the old file is finished
    p.write_text("c\n")
    assert t.poll() == [b"c"] and t.rotations == 1
    os.rename(p, tmp_path / "alert_json.txt.2")
    p.write_text("d\n")  # rotated and recreated between two polls
    assert t.poll() == [b"d"] and t.rotations == 2


def test_late_file_read_from_start_and_long_lines_dropped(tmp_path: Path) -> None:
    p = tmp_path / "late.json"
    t = FileTail(str(p), max_line=10)
    assert t.poll() == []
    p.write_text("x" * 25 + "\nshort\n" + "y" * 11)
    assert t.poll() == [b"short"]
    with p.open("a") as f:
        f.write("yyy\nok\n")
    assert t.poll() == [b"ok"] and t.too_long == 2


def test_from_start(tmp_path: Path) -> None:
    p = tmp_path / "eve.json"
    p.write_text("one\ntwo\n")
    assert FileTail(str(p), from_start=True).poll() == [b"one", b"two"]


async def test_follower_task_polls_without_busy_looping(tmp_path: Path) -> None:
    p = tmp_path / "eve.json"
    p.write_text("")
    got: list[bytes] = []

    def on_line(line: bytes) -> None:
        if line == b"boom":
            raise ValueError("a bad handler must not stop the follower")
        got.append(line)

    fol = AlertFollower([str(p)], on_line, interval=0.05)
    task = asyncio.create_task(fol.run())
    await asyncio.sleep(0.1)
    with p.open("a") as f:
        f.write("boom\nfirst\n")
    t0 = asyncio.get_running_loop().time()
    while not got and asyncio.get_running_loop().time() - t0 < 2:
        await asyncio.sleep(0.02)
    task.cancel()
    fol.close()
    assert got == [b"first"] and fol.errors == 1
    assert fol.stats()["files"][0]["path"] == str(p)


def test_retarget_keeps_the_place_of_kept_files_and_takes_up_new_ones_at_once(tmp_path: Path) -> None:
    """A reload that changes [alerts]: no alert of a file still followed is read twice or lost, a
    file added is read from its end as at start (from the moment of the reload), a file dropped is
    closed."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(b"a1\n")
    b.write_bytes(b"b-old\n")
    got: list[bytes] = []
    f = AlertFollower([str(a)], got.append)
    f.poll_once()
    with a.open("ab") as w:
        w.write(b"a2\n")  # written between the last poll and the reload
    kept = f.tails[0]
    f.retarget([str(a), str(b)], 0.5, False)
    assert got == [b"a2"] and f.tails[0] is kept and f.interval == 0.5
    with b.open("ab") as w:
        w.write(b"b1\n")
    with a.open("ab") as w:
        w.write(b"a3\n")
    f.poll_once()
    assert got == [b"a2", b"a3", b"b1"]
    f.retarget([str(b)], 0.5, False)
    assert kept._f is None and [t.path for t in f.tails] == [str(b)]
    f.close()
