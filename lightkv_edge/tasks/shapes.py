"""The embedded task: coloured shapes on a plain background, with questions whose single-word
answer depends on which object the question names.

Everything here is deterministic given a numpy Generator (numpy + PIL only, no torch), so the
engine, the benchmark and the training script draw exactly the same samples from a seed.

Images
    ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB (128 px: the embedded model sees 16x16 image tokens of
    8x8 px each), plain light-grey background, 1 to 5 objects.  Each object is a
    (colour, shape) pair, and a pair appears at most once per image, so "the red circle" always
    names one object.  Sizes run from 10 px (about one image token) to 32 px (four tokens);
    objects never overlap, keep a 2 px gap, and no two object centres share a 16x16 px cell.  Shapes are drawn without anti-aliasing, so
    ``object_map`` reproduces exactly which pixels belong to which object.

Questions (``QTYPES``), all lower case, answers are one lower-case word:
    colour  "what colour is the circle?"                    -> red|green|blue|yellow
            asked only about a shape that appears exactly once in the image.
    count   "how many red shapes are there?"                -> zero|one|two|three
            (the answer is drawn uniformly first, then the image is built to match).
    exists  "is there a red circle?"                        -> yes|no   (50/50)
    where   "is the red circle on the left or the right?"   -> left|right
            "is the red circle at the top or the bottom?"   -> top|bottom
            asked only when the object's centre is clearly off-centre on that axis
            (at least ``WHERE_MARGIN`` of the image size away from the middle), so the answer
            is never borderline.

Splits: every sample is drawn from its own Generator seeded with (split code, seed, index);
the split codes differ, so train/val/test never share a random stream.  ``dataset(split, n,
seed)`` gives n samples; any other ``seed`` gives a fresh held-out set of the same split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
BACKGROUND = (236, 236, 236)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")
QTYPES = ("colour", "count", "exists", "where")
MIN_SIZE, MAX_SIZE = 10, 32
MAX_OBJECTS = 5
GAP = 2
CELL = 16  # no two object centres fall in the same CELL x CELL block (one image token of the
           # embedded model), so "how many" questions have a well-defined answer per token
WHERE_MARGIN = 0.12

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "count": COUNT_WORDS,
    "exists": ("yes", "no"),
    "where": ("left", "right", "top", "bottom"),
}
ALL_ANSWERS = tuple(dict.fromkeys(a for v in ANSWERS.values() for a in v))

SPLITS = {"train": 11, "val": 22, "test": 33}


@dataclass
class Obj:
    colour: str
    shape: str
    x0: int  # bounding box, inclusive-exclusive: [x0, x0+size) x [y0, y0+size)
    y0: int
    size: int

    @property
    def cx(self) -> float:
        return self.x0 + self.size / 2.0

    @property
    def cy(self) -> float:
        return self.y0 + self.size / 2.0

    def as_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "x0": self.x0, "y0": self.y0,
                "size": self.size, "cx": self.cx, "cy": self.cy}


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    objects: list = field(default_factory=list)  # list[Obj]
    target: int | None = None  # index in ``objects`` of the object the question names, if any


# ---------------------------------------------------------------- drawing

def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x0, y0, x1, y1 = o.x0, o.y0, o.x0 + o.size - 1, o.y0 + o.size - 1
    if o.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif o.shape == "square":
        # a little inset so a square's area is not much larger than a circle's
        m = max(1, o.size // 10)
        draw.rectangle([x0 + m, y0 + m, x1 - m, y1 - m], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x0 + (o.size - 1) / 2.0, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def render(objects: list, size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        _draw_obj(d, o, COLOURS[o.colour])
    return img


def object_map(objects: list, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) int array: index of the object covering each pixel, -1 for background."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    for i, o in enumerate(objects):
        _draw_obj(d, o, i + 1)
    return np.asarray(m, dtype=np.int16) - 1


# ---------------------------------------------------------------- sampling

def _place(rng: np.random.Generator, pairs: list, size: int) -> list | None:
    objs: list[Obj] = []
    for colour, shape in pairs:
        for _ in range(60):
            s = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x0 = int(rng.integers(1, size - s))
            y0 = int(rng.integers(1, size - s))
            cell = (int((x0 + s / 2.0) // CELL), int((y0 + s / 2.0) // CELL))
            ok = all((x0 + s + GAP <= o.x0 or o.x0 + o.size + GAP <= x0 or
                      y0 + s + GAP <= o.y0 or o.y0 + o.size + GAP <= y0) and
                     cell != (int(o.cx // CELL), int(o.cy // CELL)) for o in objs)
            if ok:
                objs.append(Obj(colour, shape, x0, y0, s))
                break
        else:
            return None
    return objs


def _random_pairs(rng: np.random.Generator, n: int, exclude_colour: str | None = None,
                  must: list | None = None) -> list:
    must = list(must or [])
    pool = [(c, s) for c in COLOUR_NAMES for s in SHAPES
            if c != exclude_colour and (c, s) not in must]
    k = n - len(must)
    idx = rng.choice(len(pool), size=k, replace=False) if k > 0 else []
    pairs = must + [pool[i] for i in idx]
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def make_sample(rng: np.random.Generator, qtype: str | None = None, size: int = IMAGE_SIZE,
                max_objects: int = MAX_OBJECTS, min_objects: int = 1) -> Sample:
    """One (image, question, answer) sample.  ``qtype`` None picks one uniformly."""
    if qtype is None:
        qtype = QTYPES[int(rng.integers(len(QTYPES)))]
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    max_objects = max(1, min(max_objects, MAX_OBJECTS))
    min_objects = max(1, min(min_objects, max_objects))
    while True:
        if qtype == "count":
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            k = int(rng.integers(0, min(3, max_objects) + 1))
            n = int(rng.integers(max(k, min_objects, 1), max_objects + 1))
            shapes = [SHAPES[i] for i in rng.choice(3, size=k, replace=False)] if k else []
            pairs = _random_pairs(rng, n - k, exclude_colour=colour)
            pairs = pairs + [(colour, s) for s in shapes]
            pairs = [pairs[i] for i in rng.permutation(len(pairs))]
            objs = _place(rng, pairs, size)
            if objs is None:
                continue
            return Sample(render(objs, size), f"how many {colour} shapes are there?",
                          COUNT_WORDS[k], qtype, objs, None)
        n = int(rng.integers(min_objects, max_objects + 1))
        if qtype == "exists":
            present = bool(rng.integers(2))
            pairs = _random_pairs(rng, n)
            if present:
                c, s = pairs[int(rng.integers(len(pairs)))]
            else:
                absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in pairs]
                c, s = absent[int(rng.integers(len(absent)))]
            objs = _place(rng, pairs, size)
            if objs is None:
                continue
            tgt = next((i for i, o in enumerate(objs) if (o.colour, o.shape) == (c, s)), None)
            return Sample(render(objs, size), f"is there a {c} {s}?",
                          "yes" if present else "no", qtype, objs, tgt)
        pairs = _random_pairs(rng, n)
        objs = _place(rng, pairs, size)
        if objs is None:
            continue
        if qtype == "colour":
            counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
            cand = [i for i, o in enumerate(objs) if counts[o.shape] == 1]
            if not cand:
                continue
            i = cand[int(rng.integers(len(cand)))]
            return Sample(render(objs, size), f"what colour is the {objs[i].shape}?",
                          objs[i].colour, qtype, objs, i)
        # where
        axis = "x" if rng.integers(2) == 0 else "y"
        half = size / 2.0
        cand = [i for i, o in enumerate(objs)
                if abs((o.cx if axis == "x" else o.cy) - half) >= WHERE_MARGIN * size]
        if not cand:
            continue
        i = cand[int(rng.integers(len(cand)))]
        o = objs[i]
        if axis == "x":
            q = f"is the {o.colour} {o.shape} on the left or the right?"
            a = "left" if o.cx < half else "right"
        else:
            q = f"is the {o.colour} {o.shape} at the top or the bottom?"
            a = "top" if o.cy < half else "bottom"
        return Sample(render(objs, size), q, a, qtype, objs, i)


def sample_rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def iter_dataset(split: str, n: int, seed: int | None = None, start: int = 0,
                 balanced: bool = True, **kw) -> Iterator[Sample]:
    """Samples ``start .. start+n-1`` of a split.  ``balanced`` cycles the question types
    (colour, count, exists, where, colour, ...) so every type gets n/4 samples."""
    seed = 0 if seed is None else int(seed)
    for i in range(start, start + n):
        rng = sample_rng(split, seed, i)
        qt = QTYPES[i % len(QTYPES)] if balanced else None
        yield make_sample(rng, qt, **kw)


def dataset(split: str, n: int, seed: int | None = None, **kw) -> list[Sample]:
    """n samples of ``split`` ("train", "val", "test"); a different ``seed`` draws a fresh,
    equally distributed set (the benchmark's ``--seed``)."""
    return list(iter_dataset(split, n, seed, **kw))


def check_answer(sample: Sample) -> str:
    """Recompute the answer from ``sample.objects`` alone (used by the tests)."""
    q, objs = sample.question, sample.objects
    if sample.qtype == "colour":
        shape = q.split()[-1].rstrip("?")
        m = [o for o in objs if o.shape == shape]
        assert len(m) == 1
        return m[0].colour
    if sample.qtype == "count":
        colour = q.split()[2]
        return COUNT_WORDS[sum(o.colour == colour for o in objs)]
    if sample.qtype == "exists":
        _, _, _, c, s = q.rstrip("?").split()
        return "yes" if any((o.colour, o.shape) == (c, s) for o in objs) else "no"
    w = q.rstrip("?").split()
    c, s = w[2], w[3]
    m = [o for o in objs if (o.colour, o.shape) == (c, s)]
    assert len(m) == 1
    o, size = m[0], sample.image.size[0]
    if "left" in w:
        return "left" if o.cx < size / 2 else "right"
    return "top" if o.cy < size / 2 else "bottom"


def corpus_lines(n: int = 4000, seed: int = 0) -> list[str]:
    """Question/answer text for tokenizer training (no images rendered)."""
    out = []
    rng = np.random.default_rng([99, seed])
    for c in COLOUR_NAMES:
        for s in SHAPES:
            out += [f"what colour is the {s}?", f"how many {c} shapes are there?",
                    f"is there a {c} {s}?", f"is the {c} {s} on the left or the right?",
                    f"is the {c} {s} at the top or the bottom?"]
    out += list(ALL_ANSWERS)
    for _ in range(n):
        c = COLOUR_NAMES[int(rng.integers(4))]
        s = SHAPES[int(rng.integers(3))]
        out.append(f"is there a {c} {s}? what colour is the {s}?")
    return out
