"""Nothing aborts, nothing is lost: the failure modes a new user hit, one class per test.

- small contexts (every ctx_size from 1 to 300, off and embed) answer or refuse cleanly;
- corrupted model files (made here from the shipped GGUFs) fail the load in one line;
- Ctrl-C while answering keeps the conversation usable; Ctrl-C before the answer (during
  the prefill or a model load) undoes exactly what it interrupted;
- a refused or failed turn leaves the history and the KV cache as they were;
- misuse of the Python API (after close, short image buffers, bad settings, odd image
  types, two threads on one chat) raises one clear error, never a crash;
- the CLI's argument and file handling, fuzzed: exit code 0 or 2, never a signal or a
  traceback.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from PIL import Image as PILImage

from lightkv_edge.embedded import embedded_model
from lightkv_edge.errors import ClosedError, InputError, ModelError
from lightkv_edge.images import Image
from lightkv_edge.tasks import shapes

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def pair():
    return tuple(str(p) for p in embedded_model())


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Held-out test samples of the shapes task, with their images on disk."""
    d = tmp_path_factory.mktemp("shapes")
    out = []
    for i, s in enumerate(shapes.dataset("test", 6, seed=0)):
        p = d / f"{i}.png"
        s.image.save(p)
        out.append((p, s.question, s.answer))
    return out


def _chat(pair, **kw):
    from lightkv_edge.engine import VisionChat
    kw.setdefault("max_tokens", 4)
    kw.setdefault("n_threads", 1)
    return VisionChat(*pair, **kw)


def _cli(*args, input=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "lightkv_edge", *args], capture_output=True,
                          input=input, timeout=timeout, env=env, cwd=REPO)


def _one_line_error(r, *needles):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, r.stdout, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# -- 1. small contexts ----------------------------------------------------------------------
SWEEP = textwrap.dedent("""
    import json, sys
    from lightkv_edge.engine import VisionChat
    from lightkv_edge.errors import InputError
    model, mmproj, image, question = sys.argv[1:5]
    out = []
    for mode in ("off", "embed"):
        for c in list(range(1, 301)) + [4096]:
            chat = VisionChat(model, mmproj, mode=mode, ctx_size=c, max_tokens=3,
                              n_threads=1)
            try:
                out.append((mode, c, "ok", chat.ask(question, [image]), chat.m.n_ctx))
                # a long prompt in the same context: answered or refused, never an abort
                try:
                    chat.reset()
                    chat.ask("tell me " * 60 + question, [image])
                    out.append((mode, c, "long-ok", "", chat.m.n_ctx))
                except InputError as e:
                    out.append((mode, c, "long-refused", str(e), chat.m.n_ctx))
            except InputError as e:
                out.append((mode, c, "refused", str(e), chat.m.n_ctx))
            finally:
                chat.close()
    print(json.dumps(out))
""")


def test_every_small_context_answers_or_refuses(pair, samples):
    """ctx_size 1..300 in off and embed: llama.cpp rounds the cache up to 256 cells but
    used to cut the batch to the size asked for, and the engine sent bigger batches
    (GGML_ASSERT). Now each answers like a large context, or refuses in one line."""
    image, question, _ = samples[0]
    r = subprocess.run([sys.executable, "-c", SWEEP, *pair, str(image), question],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    short = [row for row in rows if row[2] in ("ok", "refused")]
    assert len(short) == 2 * 301                          # every size, both modes
    for mode in ("off", "embed"):
        big = next(row for row in short if row[0] == mode and row[1] == 4096)
        assert big[2] == "ok" and big[3].strip()
        for row in short:
            if row[0] == mode:
                # the image and question need < 100 cells: every context holds them
                assert row[2] == "ok", row
                assert row[3] == big[3], row                  # the same greedy answer
                assert row[4] >= 256 and row[4] % 256 == 0
    long = [row for row in rows if row[2].startswith("long")]
    assert len(long) == 2 * 301
    assert {row[2] for row in long} == {"long-ok"} or all(
        "unchanged" in row[3] for row in long if row[2] == "long-refused")


# -- 2. corrupted model files -------------------------------------------------------------
def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _corrupt_a_token(src: str, dst: Path) -> None:
    """Change one byte of one vocabulary string so that it equals another token."""
    from gguf import GGUFReader
    field = GGUFReader(src).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]) for i in field.data]
    by_len = {}
    for t in tokens:
        by_len.setdefault(len(t), []).append(t)
    for a in tokens:
        for b in by_len[len(a)]:
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            if len(diff) == 1 and len(a) > 2:
                data = bytearray(Path(src).read_bytes())
                at = data.index(_gguf_string(a), data.index(b"tokenizer.ggml.tokens"))
                data[at + 8 + diff[0]] = b[diff[0]]
                dst.write_bytes(bytes(data))
                return
    raise AssertionError("no two tokens differ in one byte")


def _corrupt_head_count(src: str, dst: Path) -> int:
    """Set the vision head count to a value that does not divide the embedding width."""
    from gguf import GGUFReader
    fields = GGUFReader(src).fields
    n_embd = int(fields["clip.vision.embedding_length"].parts[-1][0])
    bad = next(h for h in range(3, 256) if n_embd % h)
    data = bytearray(Path(src).read_bytes())
    key = _gguf_string(b"clip.vision.attention.head_count")
    at = data.index(key) + len(key) + 4          # after the key and its uint32 type
    old = struct.unpack_from("<I", data, at)[0]
    assert n_embd % old == 0 and bad < 256 and old < 256    # a single-byte change
    struct.pack_into("<I", data, at, bad)
    dst.write_bytes(bytes(data))
    return bad


def test_corrupted_files_fail_the_load_in_one_line(pair, samples, tmp_path):
    image = samples[0][0]
    text_bad = tmp_path / "dup-token.gguf"
    _corrupt_a_token(pair[0], text_bad)
    assert sum(a != b for a, b in zip(Path(pair[0]).read_bytes(), text_bad.read_bytes())) == 1
    _one_line_error(_cli("chat", image, "-p", QUESTION, "--model", text_bad,
                         "--mmproj", pair[1]), "could not load", "duplicate")
    mmproj_bad = tmp_path / "heads.gguf"
    _corrupt_head_count(pair[1], mmproj_bad)
    assert sum(a != b for a, b in zip(Path(pair[1]).read_bytes(),
                                      mmproj_bad.read_bytes())) == 1
    for mode in ("off", "embed"):
        _one_line_error(_cli("chat", image, "-p", QUESTION, "--model", pair[0],
                             "--mmproj", mmproj_bad, "--mode", mode), "attention heads")


# -- 3. Ctrl-C -------------------------------------------------------------------------------
def _sigint_after(fn, on_call: int):
    """`fn`, but the on_call-th call is followed by a real SIGINT to this process, as if
    the user pressed Ctrl-C while it ran (Python handles it at the next bytecode)."""
    calls = [0]

    def wrapped(*a):
        rc = fn(*a)
        calls[0] += 1
        if calls[0] == on_call:
            os.kill(os.getpid(), signal.SIGINT)
        return rc
    return wrapped


@pytest.mark.parametrize("mode", ["off", "embed"])
def test_ctrl_c_while_answering_keeps_the_conversation(pair, samples, monkeypatch, mode):
    """The signal lands right after a token's llama_decode: that token's bookkeeping
    completes first, the partial answer stays, and the next turn answers exactly as a
    conversation that stopped after the same tokens does."""
    from lightkv_edge import engine
    image, q1, _ = samples[1]
    _, q2, _ = samples[2]
    with _chat(pair, mode=mode, max_tokens=2) as clean:
        clean.ask(q1, [image])                 # stops after 2 tokens (or at the end)
        n_kept = clean.last_stats.n_decoded
        want = clean.ask(q2)
        want_history = [(t.role, t.content) for t in clean.history]
    with _chat(pair, mode=mode, max_tokens=2) as chat:
        real = engine.llama_cpp.llama_decode
        # prefill decodes are mtmd's own; the engine's llama_decode calls are the
        # answer's tokens: interrupt right after the second (or the first, if the
        # answer is one token)
        monkeypatch.setattr(engine.llama_cpp, "llama_decode",
                            _sigint_after(real, max(n_kept, 1) + (mode == "embed")))
        pieces = []
        with pytest.raises(KeyboardInterrupt):
            for piece in chat.stream(q1, [image], max_tokens=50):
                pieces.append(piece)
        monkeypatch.setattr(engine.llama_cpp, "llama_decode", real)
        assert chat.last_stats.stop == "interrupted"
        assert chat.last_stats.n_decoded == n_kept
        assert chat.ask(q2) == want
        assert [(t.role, t.content) for t in chat.history] == want_history


def test_ctrl_c_during_the_prefill_undoes_the_turn(pair, samples, monkeypatch):
    from lightkv_edge import engine
    image, q1, _ = samples[1]
    _, q2, _ = samples[2]
    with _chat(pair, mode="embed") as clean:
        clean.ask(q1, [image])
        want = clean.ask(q2, [image])
    # no image cache: the second turn's picture must go through the encoder again
    with _chat(pair, mode="embed", image_cache=0) as chat:
        chat.ask(q1, [image])
        before = (len(chat.history), chat.n_cells, chat.n_past, chat.m.kv_bytes())
        real = engine.mtmd.encode_chunk
        monkeypatch.setattr(engine.mtmd, "encode_chunk", _sigint_after(real, 1))
        with pytest.raises(KeyboardInterrupt):
            chat.ask(q2, [image])
        monkeypatch.setattr(engine.mtmd, "encode_chunk", real)
        assert (len(chat.history), chat.n_cells, chat.n_past, chat.m.kv_bytes()) == before
        assert chat.ask(q2, [image]) == want


def test_ctrl_c_during_the_model_load_stops_it(pair, monkeypatch, capfd):
    """llama.cpp calls our progress callback while it loads; a KeyboardInterrupt raised
    inside a ctypes callback would be printed and lost. The load stops instead."""
    from lightkv_edge import model
    real = model.llama_cpp.llama_model_load_from_file

    def load_with_ctrl_c(*a):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a)
    monkeypatch.setattr(model.llama_cpp, "llama_model_load_from_file", load_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _chat(pair)
    assert "Exception ignored" not in capfd.readouterr().err


# -- 4. a refused or failed turn changes nothing ---------------------------------------------
def test_a_refused_turn_leaves_history_and_kv_unchanged(pair, samples):
    image, q1, _ = samples[3]
    _, q2, _ = samples[4]
    with _chat(pair, mode="embed", ctx_size=256) as clean:
        clean.ask(q1, [image])
        want = clean.ask(q2)
    with _chat(pair, mode="embed", ctx_size=256) as chat:
        chat.ask(q1, [image])
        before = ([(t.role, t.content) for t in chat.history], chat.n_cells, chat.n_past,
                  chat.m.kv_bytes())
        with pytest.raises(InputError, match="unchanged") as e:
            chat.ask("tell me " * 200 + q2, [image])
        assert e.value.param == "ctx_size"
        assert ([(t.role, t.content) for t in chat.history], chat.n_cells, chat.n_past,
                chat.m.kv_bytes()) == before
        assert chat.ask(q2) == want


def test_a_failed_prefill_leaves_history_and_kv_unchanged(pair, samples, monkeypatch):
    from lightkv_edge import engine
    image, q1, _ = samples[3]
    _, q2, _ = samples[4]
    with _chat(pair, mode="embed") as clean:
        clean.ask(q1, [image])
        want = clean.ask(q2, [image])
    with _chat(pair, mode="embed") as chat:
        chat.ask(q1, [image])
        before = (len(chat.history), chat.n_cells, chat.n_past, chat.m.kv_bytes())
        real = engine.llama_cpp.llama_decode
        calls = [0]

        def fail_second(*a):      # the image's first batch lands, then a decode fails
            calls[0] += 1
            return 1 if calls[0] == 2 else real(*a)
        monkeypatch.setattr(engine.llama_cpp, "llama_decode", fail_second)
        monkeypatch.setattr(chat.m, "n_batch", 8)     # several batches for the image
        with pytest.raises(ModelError):
            chat.ask(q2, [image])
        monkeypatch.undo()
        assert calls[0] == 2
        assert (len(chat.history), chat.n_cells, chat.n_past, chat.m.kv_bytes()) == before
        assert chat.ask(q2, [image]) == want


def test_cli_interactive_refused_turn_is_said_and_its_image_dropped(pair, samples):
    image, question, _ = samples[0]
    script = ("tell me " * 200 + "\n" + question + "\n/stats\n/quit\n").encode()
    r = _cli("chat", image, "-c", "256", "-n", "3", "--model", pair[0], "--mmproj", pair[1],
             input=script)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "unchanged" in err and "-c/--ctx-size" in err and "attach it again" in err
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["vision_tokens_in"] == 0       # the refused turn's image did not come back
    assert "Traceback" not in err


# -- 5. the Python API, misused ---------------------------------------------------------------
def test_calls_after_close_raise(pair, samples):
    chat = _chat(pair)
    chat.close()
    chat.close()                                   # harmless
    for call in (lambda: chat.ask(QUESTION, [samples[0][0]]), chat.reset,
                 lambda: list(chat.stream(QUESTION))):
        with pytest.raises(ClosedError):
            call()


def test_bad_images_and_settings_raise_one_clear_error(pair, samples):
    image = samples[0][0]
    with pytest.raises(InputError, match="needs 300"):
        Image("short", 10, 10, b"\0" * 10)
    for w, h in ((0, 5), (5, -1), (2.5, 2), (True, 1)):
        with pytest.raises(InputError, match="positive integer"):
            Image("bad", w, h, b"")
    with pytest.raises(InputError, match="bytes"):
        Image("bad", 1, 1, [0, 0, 0])
    bad_settings = [dict(temp=math.nan), dict(temp=-1), dict(keep=math.nan), dict(keep=0),
                    dict(max_tokens=0), dict(max_tokens=2.5), dict(ctx_size=0),
                    dict(seed=-1), dict(windows=0), dict(n_threads=0), dict(mode="fast"),
                    dict(method="magic"), dict(positions="random")]
    for kw in bad_settings:
        with pytest.raises(InputError) as e:
            _chat(pair, **kw)
        assert e.value.param == next(iter(kw)), kw
    with _chat(pair) as chat:
        for images, why in (([None], "NoneType"), ([3.5], "float"), ([object()], "object")):
            with pytest.raises(InputError, match=why):
                chat.stream(QUESTION, images)
        with pytest.raises(InputError, match="max_tokens"):
            chat.stream(QUESTION, [image], max_tokens=0)
        with pytest.raises(InputError, match="UTF-8"):
            chat.stream("\udcff " + QUESTION, [image])
        with pytest.raises(InputError, match="prompt must be a str"):
            chat.stream(b"what", [image])
        # every accepted kind of image gives the same answer
        want = chat.ask(QUESTION, [image])
        for alt in (str(image), os.fsencode(image), Path(image), PILImage.open(image),
                    image):                         # one path alone, not in a list
            chat.reset()
            assert chat.ask(QUESTION, alt if alt is image else [alt]) == want
        assert chat.last_stats.vision_tokens_in > 0
        # max_tokens=1 means one token, not the default
        chat.reset()
        chat.ask(QUESTION, [image], max_tokens=1)
        assert chat.last_stats.n_decoded + (chat.last_stats.stop == "eog") <= 1


def test_two_threads_on_one_chat_take_turns(pair, samples):
    """Calls from two threads wait for each other; a second stream from the thread that
    is still consuming one is refused."""
    with _chat(pair, mode="embed") as chat:
        want = chat.ask(QUESTION, [samples[0][0]])
        chat.reset()
        answers, errors = [], []

        def worker(p, q):
            # the two threads share one conversation: their turns interleave whole
            try:
                for _ in range(4):
                    answers.append(chat.ask(q, [p]))
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=s[:2]) for s in samples[:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert len(answers) == 8 and all(a.strip() for a in answers)
        assert [t.role for t in chat.history] == ["user", "assistant"] * 8
        assert [t.content for t in chat.history[1::2]] == answers
        last = chat.last_stats           # the answer's tokens (and its end token) follow
        assert chat.n_cells - last.kv_cells == last.n_decoded + (last.stop == "eog")
        chat.reset()
        assert chat.ask(QUESTION, [samples[0][0]]) == want
        first = chat.stream(QUESTION, [samples[0][0]])
        next(first)
        with pytest.raises(InputError, match="still streaming"):
            next(chat.stream(QUESTION, [samples[0][0]]))
        first.close()
        assert chat.ask(QUESTION, [samples[0][0]])       # free again


# -- 6. the command line ------------------------------------------------------------------------
def test_cli_invalid_utf8_prompt_and_huge_png(pair, samples, tmp_path):
    image = samples[0][0]
    _one_line_error(_cli("chat", image, "-p", b"\xff what colour?", "--model", pair[0],
                         "--mmproj", pair[1]), "UTF-8")
    huge = tmp_path / "huge.png"
    PILImage.new("1", (12000, 12000)).save(huge)     # 144 MP: PIL warns before we look
    _one_line_error(_cli("chat", huge, "-p", QUESTION), "too large")


FUZZ_CASES = 48


def test_cli_fuzz_exits_0_or_2_without_traceback(pair, samples, tmp_path):
    """Seeded random command lines built from the CLI's own flags, good and bad values and
    every kind of file; each must end with exit code 0 or 2, no signal, no traceback,
    and one line on stderr when it fails."""
    rng = random.Random(1234)
    image = str(samples[0][0])
    notimg = tmp_path / "text.png"
    notimg.write_text("not a picture")
    trunc = tmp_path / "cut.png"
    trunc.write_bytes(Path(image).read_bytes()[:100])
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    cut_gguf = tmp_path / "cut.gguf"
    cut_gguf.write_bytes(Path(pair[0]).read_bytes()[:5000])
    bad_files = [str(notimg), str(trunc), str(tmp_path), str(tmp_path / "nope"), str(empty),
                 pair[0], "-"]
    bad_models = [(pair[1], pair[0]), (str(cut_gguf), pair[1]), (pair[0], str(empty)),
                  (str(notimg), pair[1]), (pair[0], None)]
    values = {"--keep": ["0.5", "1", "0", "2", "nan", "-1", "x", ""],
              "--windows": ["1", "2", "0", "-3", "99", "x"],
              "-c": ["1", "16", "64", "300", "0", "-5", "x"],
              "-n": ["1", "3", "0", "x"], "--temp": ["0", "0.7", "nan", "-1", "inf"],
              "--seed": ["0", "7", "-1", "x"], "--mode": ["off", "embed", "layer", "x"],
              "-t": ["1", "0", "x"], "--model-name": ["shapes-8x8", "shapes-16x16", "x"]}
    prompts = ["", "   ", "is there a square?" * 30, "\u00e9\u4e2d?", "<__media__> what?"]

    # each case: a valid command line, then 0-2 random mutations of it
    def mutate(argv):
        kind = rng.choice(["file", "model", "value", "value", "flag", "prompt", "drop-p"])
        if kind == "file":
            argv.insert(1 + rng.randint(0, 1), rng.choice(bad_files))
        elif kind == "model":
            m = rng.choice(bad_models)
            i = argv.index("--model")
            argv[i + 1] = m[0]
            if m[1] is None:
                del argv[i + 2:i + 4]
            else:
                argv[i + 3] = m[1]
        elif kind == "value":
            flag = rng.choice(sorted(values))
            argv += [flag, rng.choice(values[flag])]
        elif kind == "flag":
            argv.append(rng.choice(["--stats", "--json", "--ignore-eos", "--bogus", "-v"]))
        elif kind == "prompt":
            argv[argv.index("-p") + 1] = rng.choice(prompts)
        else:                                   # interactive, stdin at its end: exit 0
            i = argv.index("-p")
            del argv[i:i + 2]

    outcomes = []
    for _ in range(FUZZ_CASES):
        argv = ["chat", image, "-p", QUESTION, "--model", pair[0], "--mmproj", pair[1],
                "-n", "3"]
        for _ in range(rng.choice([0, 1, 1, 2])):
            mutate(argv)
        r = _cli(*argv, input=b"", timeout=120)
        err = r.stderr.decode("utf-8", "replace")
        assert r.returncode in (0, 2), (argv, r.returncode, err[-1500:])
        assert "Traceback" not in err, (argv, err[-1500:])
        if r.returncode == 2 and "-v" not in argv:
            assert len([line for line in err.splitlines() if line.strip()]) == 1, (argv, err)
        outcomes.append(r.returncode)
    # the draw reaches both ends: real answers and refusals
    assert len(outcomes) == FUZZ_CASES
    assert outcomes.count(0) >= 5 and outcomes.count(2) >= 5, outcomes
