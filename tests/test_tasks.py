"""The shapes task generator: determinism, disjoint splits, answers consistent with objects."""
import hashlib
from collections import Counter

import numpy as np
import pytest

from lightkv_edge.tasks import shapes as S


def _digest(sample):
    return hashlib.sha256(sample.image.tobytes() + sample.question.encode()).hexdigest()


def test_deterministic():
    a = S.dataset("test", 24, seed=3)
    b = S.dataset("test", 24, seed=3)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert [s.answer for s in a] == [s.answer for s in b]
    c = S.dataset("test", 24, seed=4)
    assert [_digest(s) for s in a] != [_digest(s) for s in c]


def test_splits_disjoint():
    h = {sp: {_digest(s) for s in S.dataset(sp, 150)} for sp in ("train", "val", "test")}
    assert not (h["train"] & h["val"])
    assert not (h["train"] & h["test"])
    assert not (h["val"] & h["test"])


def test_unknown_split_and_qtype():
    with pytest.raises(ValueError):
        S.dataset("dev", 1)
    with pytest.raises(ValueError):
        S.make_sample(np.random.default_rng(0), "size")


def test_answers_consistent_and_single_word():
    data = S.dataset("val", 400, seed=1)
    for s in data:
        assert s.answer == S.check_answer(s), s.question
        assert s.answer in S.ANSWERS[s.qtype]
        assert " " not in s.answer
        assert s.image.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and s.image.mode == "RGB"
    types = Counter(s.qtype for s in data)
    assert set(types) == set(S.QTYPES) and min(types.values()) == 100


def test_objects_valid():
    for s in S.dataset("train", 200, seed=5):
        objs = s.objects
        assert 1 <= len(objs) <= S.MAX_OBJECTS
        pairs = [(o.colour, o.shape) for o in objs]
        assert len(set(pairs)) == len(pairs)  # a (colour, shape) pair at most once
        cells = {(int(o.cx // S.CELL), int(o.cy // S.CELL)) for o in objs}
        assert len(cells) == len(objs)
        om = S.object_map(objs)
        for i, o in enumerate(objs):
            assert S.MIN_SIZE <= o.size <= S.MAX_SIZE
            assert (om == i).sum() > 0.3 * o.size * o.size
            # the pixels of the object carry its colour
            px = np.asarray(s.image)[om == i]
            assert (px == np.array(S.COLOURS[o.colour], dtype=np.uint8)).all()
        assert (np.asarray(s.image)[om < 0] == np.array(S.BACKGROUND, dtype=np.uint8)).all()


def test_question_rules():
    for s in S.dataset("test", 400, seed=2):
        if s.qtype == "colour":
            shape = s.question.split()[-1].rstrip("?")
            assert sum(o.shape == shape for o in s.objects) == 1
        if s.qtype == "where":
            o = s.objects[s.target]
            c = o.cx if "left" in s.question else o.cy
            assert abs(c - S.IMAGE_SIZE / 2) >= S.WHERE_MARGIN * S.IMAGE_SIZE


def test_answer_balance():
    data = S.dataset("train", 2000, seed=0)
    for qt in S.QTYPES:
        c = Counter(s.answer for s in data if s.qtype == qt)
        top = max(c.values()) / sum(c.values())
        assert top < {"colour": 0.35, "count": 0.35, "exists": 0.6, "where": 0.4}[qt], (qt, c)
