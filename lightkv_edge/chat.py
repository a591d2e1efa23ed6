"""The `chat` command: one answer with -p, or an interactive multi-turn chat."""
from __future__ import annotations

import json
import sys

from .errors import InputError, LightKVError
from .cli import user_message
from .images import load_image

HELP = """\
commands:
  /image PATH   attach an image to your next message (repeatable)
  /reset        forget the conversation and its images
  /stats        statistics of the last answer
  /help         this text
  /quit         leave (also Ctrl-D); Ctrl-C stops an answer
"""


def _open_chat(args):
    from .engine import VisionChat

    model, mmproj = args.model, args.mmproj
    if args.hf_repo:
        if model or mmproj:
            raise InputError("give either --hf-repo or --model/--mmproj, not both")
        from .hub import resolve
        pair = resolve(args.hf_repo, hf_file=args.hf_file)
        model, mmproj = pair.model, pair.mmproj
    elif args.hf_file:
        raise InputError("--hf-file needs --hf-repo")
    if args.model_name and (model or mmproj):
        raise InputError("give either --model-name or --model/--mmproj, not both")
    if (model is None) != (mmproj is None):
        raise InputError("give both --model and --mmproj (or neither, for the embedded "
                         "model)")
    return VisionChat(model, mmproj, mode=args.mode, keep=args.keep, windows=args.windows,
                      ctx_size=args.ctx_size, n_threads=args.threads,
                      gpu_layers=args.gpu_layers, temp=args.temp, seed=args.seed,
                      max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                      verbose=args.verbose, model_name=args.model_name,
                      schedule=args.schedule, kv=args.kv, method=args.method,
                      evict=args.evict, decode_evict=args.decode_evict,
                      evict_layers=args.evict_layers, evict_window=args.evict_window,
                      evict_adaptive=args.evict_adaptive, image_cache=args.image_cache)


def _answer(chat, prompt, images, *, echo: bool) -> str:
    pieces = []
    for piece in chat.stream(prompt, images):
        pieces.append(piece)
        if echo:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if echo:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(pieces)


def _check_show_merge(args) -> None:
    """--show-merge is checked before any model loads: a writable image path, embed mode."""
    if getattr(args, "show_merge", None) is None:
        return
    from .merge_picture import check_output_path
    check_output_path(args.show_merge)
    if args.mode != "embed":
        raise InputError("--show-merge draws embed mode's merge (--mode embed)")
    if args.keep >= 1.0:
        raise InputError("--show-merge needs --keep below 1 (nothing is merged at 1)")


def _show_merge(chat, args) -> None:
    if getattr(args, "show_merge", None) is not None and chat.last_merges:
        for p in chat.show_merge(args.show_merge):
            print(f"(merge picture: {p})", file=sys.stderr)


def run_chat(args) -> int:
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("empty prompt (-p)")
    _check_show_merge(args)
    images = [load_image(p) for p in args.images]  # fail fast, before loading a model
    chat = _open_chat(args)
    try:
        if args.prompt is not None:
            answer = _answer(chat, args.prompt, images, echo=not args.json)
            _show_merge(chat, args)
            stats = chat.last_stats.as_dict()
            if args.json:
                print(json.dumps({"answer": answer, "stats": stats}))
            elif args.stats:
                print(json.dumps(stats))
            return 0
        return _interactive(chat, images, args)
    finally:
        chat.close()


def _interactive(chat, pending, args) -> int:
    err = sys.stderr
    print(f"lightkv-edge chat ({args.mode} mode"
          + (f", keep {args.keep}" if args.mode != "off" else "")
          + f"); {len(pending)} image(s) attached. /help for commands.", file=err)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print(file=err)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print(HELP, file=err, end="")
            elif cmd == "/reset":
                chat.reset()
                pending = []
                print("(conversation cleared)", file=err)
            elif cmd == "/stats":
                s = chat.last_stats
                print(json.dumps(s.as_dict()) if s else "(no answer yet)", file=err)
            elif cmd == "/image":
                try:
                    pending.append(load_image(rest.strip()))
                    print(f"(image {rest.strip()} attached to your next message)", file=err)
                except InputError as e:
                    print(f"error: {user_message(e)}", file=err)
            else:
                print(f"unknown command {cmd} (/help)", file=err)
            continue
        # a message is sent with the images attached so far; whatever happens, they are
        # not attached again to the next one
        sending, pending = pending, []
        turns = len(chat.history)
        try:
            _answer(chat, line, sending, echo=True)
            _show_merge(chat, args)
            if args.stats:
                print(json.dumps(chat.last_stats.as_dict()), file=err)
        except KeyboardInterrupt:
            if len(chat.history) > turns:
                print("\n(stopped; the answer so far stays in the conversation)", file=err)
            else:
                print("\n(stopped before the answer; the message was not sent"
                      + _dropped(sending) + ")", file=err)
        except LightKVError as e:
            print(f"error: {user_message(e)}", file=err)
            if sending:
                print(f"({_dropped(sending).lstrip('; ')})", file=err)


def _dropped(images) -> str:
    if not images:
        return ""
    return (f"; its {len(images)} image(s) were not kept: attach them again with /image"
            if len(images) > 1 else "; its image was not kept: attach it again with /image")
