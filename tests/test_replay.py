"""The replay buffer: bounded, hashed, deduplicated, class-balanced, stored with its (accepted) session."""

import hashlib
import json
from collections import Counter

from PIL import Image

from lorsu_edge.replay import MANIFEST, REPLAY_DIR, Entry, draw, evict, read_buffer, stored_size, write_buffer
from lorsu_edge.samples import read_samples
from lorsu_edge.tiny import _image_processor, write_toy_images


def _entries(counts: dict[str, int]) -> list[Entry]:
    return [Entry(f"{label}{i}", f"{label}{i}.png", "x", "0001", label) for label, n in counts.items()
            for i in range(n)]


def test_draw_is_class_balanced_and_bounded():
    entries = _entries({"a": 10, "b": 2, "c": 5})
    picked = draw(entries, 7, seed=0)
    assert len(picked) == 7 and len(set(picked)) == 7
    assert Counter(e.label for e in picked) == {"a": 3, "b": 2, "c": 2}  # b runs out, a and c share the rest
    assert draw(entries, 100, seed=0) and len(draw(entries, 100, seed=0)) == 17
    assert draw(entries, 7, seed=0) == picked and draw(entries, 7, seed=1) != picked  # seeded


def test_evict_keeps_the_capacity_by_dropping_the_largest_class_oldest_first():
    entries = _entries({"a": 6, "b": 2})
    kept = evict(entries, 5)
    assert len(kept) == 5 and Counter(e.label for e in kept) == {"a": 3, "b": 2}
    assert [e.sha256 for e in kept if e.label == "a"] == ["a3", "a4", "a5"]


def _session_dir(root, sid):
    d = root / "sessions" / sid
    d.mkdir(parents=True)
    return d


def test_buffer_is_written_small_hashed_deduplicated_and_linked(tmp_path):
    """Catches: images stored at full size, duplicates stored twice, a tampered file replayed."""
    proc = _image_processor("clip")
    data = read_samples(write_toy_images(tmp_path / "d1", labels=("red", "blue"), per_class=3, size=80))
    s1 = _session_dir(tmp_path, "0001")
    first = write_buffer(s1, "0001", [], None, data.samples, capacity=100, processor=proc)
    assert len(first) == 6 and read_buffer(s1) == first
    side = stored_size(proc)
    for e in first:
        with Image.open(s1 / REPLAY_DIR / e.file) as im:
            assert min(im.size) == side < 80
        assert hashlib.sha256((s1 / REPLAY_DIR / e.file).read_bytes()).hexdigest() == e.file_sha256

    more = read_samples(write_toy_images(tmp_path / "d2", labels=("green",), per_class=4, size=20, seed=3))
    s2 = _session_dir(tmp_path, "0002")
    second = write_buffer(s2, "0002", first, s1, [*data.samples[:2], *more.samples], capacity=8, processor=proc)
    assert len(second) == 8 and len({e.sha256 for e in second}) == 8  # the 2 repeats are not stored again
    # 3 red + 3 blue + 4 green over 8: the oldest green, then (a 3-3-3 tie broken by name) the oldest red go
    assert Counter(e.label for e in second) == {"red": 2, "blue": 3, "green": 3}
    s3 = _session_dir(tmp_path, "0003")
    roomy = write_buffer(s3, "0003", first, s1, [*data.samples[:2], *more.samples], capacity=100, processor=proc)
    assert len(roomy) == 10 and [e.sha256 for e in roomy[:6]] == [e.sha256 for e in first]  # repeats: once
    kept_old = next(e for e in second if e.session == "0001")
    assert (s2 / REPLAY_DIR / kept_old.file).stat().st_ino == (s1 / REPLAY_DIR / kept_old.file).stat().st_ino
    assert {p.name for p in (s2 / REPLAY_DIR).iterdir()} == {e.file for e in second} | {MANIFEST}
    with Image.open(s2 / REPLAY_DIR / next(e for e in second if e.label == "green").file) as im:
        assert im.size == (20, 20)  # never upscaled

    victim = s2 / REPLAY_DIR / second[-1].file
    victim.unlink()
    victim.write_bytes(b"not the stored image")
    assert len(read_buffer(s2)) == 7 and second[-1] not in read_buffer(s2)
    assert [json.loads(x)["sha256"] for x in (s2 / REPLAY_DIR / MANIFEST).read_text().splitlines()] == \
        [e.sha256 for e in second]


def test_vqa_samples_are_balanced_by_their_answer():
    """Catches balancing VQA rows by their question: the demo's nights ask three phrasings of one question at
    random, so a question-balanced draw is blind to the animals (here 4 of 10 drawn at random, dogs left out)."""
    entries = [Entry(f"{a}{i}", f"{a}{i}.png", "x", "0001", None, "What animal is this?", a)
               for a, n in (("a cat", 8), ("a dog", 2)) for i in range(n)]
    for seed in range(3):
        assert Counter(e.answer for e in draw(entries, 4, seed)) == {"a cat": 2, "a dog": 2}
    assert Counter(e.answer for e in evict(entries, 4)) == {"a cat": 2, "a dog": 2}
