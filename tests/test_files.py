"""dorafs/files.py: the atomic file write the daemons save their state with."""

from __future__ import annotations

import threading

from dorafs.files import write_atomic


def test_writes_of_one_file_at_once_never_take_each_others_temporary_file(tmp_path):
    # A registry saves a job from its run and from an API call, each in a thread: with one
    # temporary name per file, one write renamed the other's away (FileNotFoundError).
    path = tmp_path / "job.json"
    texts = [f"writer {i}\n" * 100 for i in range(8)]
    errors = []

    def write(text: str) -> None:
        try:
            for _ in range(100):
                write_atomic(path, text)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no temporary file left
