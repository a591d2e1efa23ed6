"""Pictures of the benchmark: what a person would rather look at than read in a table.

- quality_plot: accuracy vs kept fraction, one line per method, one panel per model, with
  the 95 % intervals as bands and `off` (all tokens) as a dashed line;
- cost_plots: prefill time and KV bytes vs kept fraction per mode (medians, min-max bars),
  and the time to first token of every configuration stacked into vision encode, merge
  (with its guidance), LLM prefill and the rest (first sampled token, bookkeeping).

Input: the JSON that `bench --json` and `cost --json` write. matplotlib is needed only
here (a development dependency): a missing one is a one-line error.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")             # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the plots need matplotlib (pip install matplotlib)",
                         param="plots") from None
    return plt


def quality_plot(bench: dict, path: Path) -> Path:
    """Accuracy vs kept fraction for every method of a `bench --json` result, a panel per
    model it measured."""
    plt = _pyplot()
    models = bench["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        by_method: dict[str, list[dict]] = {}
        for r in bench["results"]:
            if r["model"] == model:
                by_method.setdefault(r["method"], []).append(r)
        for method, rows in sorted(by_method.items()):
            if method == "off":
                r = rows[0]
                ax.axhline(r["accuracy"], color="black", ls="--", lw=1,
                           label=f"off (all tokens) {r['accuracy']:.3f}")
                ax.axhspan(*r["ci95"], color="black", alpha=0.06)
                continue
            rows = sorted(rows, key=lambda r: r["keep"])
            k = [r["keep"] for r in rows]
            line, = ax.plot(k, [r["accuracy"] for r in rows], marker="o", ms=4, label=method)
            ax.fill_between(k, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows],
                            color=line.get_color(), alpha=0.12)
        n = next(iter(by_method.values()))[0]["n"]
        ax.set_title(f"{model}: {bench['split']} split, seed {bench['seed']}, n = {n} per point",
                     fontsize=9)
        ax.set_xlabel("kept fraction of vision tokens")
        ax.set_ylabel("accuracy (band: 95 % Wilson interval)")
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_plots(cost: dict, outdir: Path) -> list[Path]:
    """The three cost pictures of one `cost --json` result; returns the files written."""
    plt = _pyplot()
    outdir.mkdir(parents=True, exist_ok=True)
    stem = Path(cost["model"]).stem
    rows = cost["rows"]
    modes = sorted({r["mode"] for r in rows if r["mode"] != "off"})
    off = next((r for r in rows if r["mode"] == "off"), None)
    written = []

    def by_keep(figure: str, scale: float = 1.0):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in modes:
            rs = sorted((r for r in rows if r["mode"] == m), key=lambda r: r["keep"])
            k = [r["keep"] for r in rs]
            med = [r[figure]["median"] * scale for r in rs]
            lo = [(r[figure]["median"] - r[figure]["min"]) * scale for r in rs]
            hi = [(r[figure]["max"] - r[figure]["median"]) * scale for r in rs]
            ax.errorbar(k, med, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=m)
        if off:
            ax.axhline(off[figure]["median"] * scale, color="black", ls="--", lw=1,
                       label="off (all tokens)")
        ax.set_xlabel("kept fraction of vision tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig, ax

    fig, ax = by_keep("t_prefill_ms")
    ax.set_ylabel("LLM prefill ms (median, bars min-max)")
    ax.set_title(f"{stem}: prefill, {cost['runs']} runs, {cost['threads'] or 'all'} threads",
                 fontsize=9)
    written.append(_save(plt, fig, outdir / f"cost-prefill-{stem}.png"))

    fig, ax = by_keep("kv_bytes", 1 / 2**20)
    ax.set_ylabel("KV cache after the prefill, MiB")
    ax.set_title(f"{stem}: KV cache", fontsize=9)
    written.append(_save(plt, fig, outdir / f"cost-kv-{stem}.png"))

    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows) + 2), 4))
    names = [r["config"] for r in rows]
    parts = [("vision encode", "t_encode_ms"), ("merge + guidance", "t_merge_ms"),
             ("LLM prefill", "t_prefill_ms")]
    bottom = [0.0] * len(rows)
    for label, f in parts:
        v = [r[f]["median"] for r in rows]
        ax.bar(names, v, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, v)]
    rest = [max(0.0, r["ttft_ms"]["median"] - b) for r, b in zip(rows, bottom)]
    ax.bar(names, rest, bottom=bottom, label="first token and the rest", color="lightgrey")
    ax.set_ylabel("time to first token, ms (medians)")
    ax.set_title(f"{stem}: where the time to the first token goes", fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    written.append(_save(plt, fig, outdir / f"cost-ttft-{stem}.png"))
    return written


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
