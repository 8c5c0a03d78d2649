"""`interlatent report`: the multiscale comparison of a run's transcoders, as in the seed post's
2/4/8 discussion: a markdown table of quality figures and a plot against latent count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_report"]

_COLUMNS = (
    ("l0", "L0", "{:.2f}"),
    ("fvu", "FVU", "{:.4f}"),
    ("mse", "MSE", "{:.3g}"),
    ("dead_frac", "dead", "{:.2f}"),
    ("dense_frac", "dense", "{:.2f}"),
    ("return_clean", "R clean", "{:.1f}"),
    ("return_spliced", "R spliced", "{:.1f}"),
    ("return_ablated", "R ablated", "{:.1f}"),
    ("return_recovered", "recovered", "{:.3f}"),
)


def _cell(q: dict[str, Any], key: str, fmt: str) -> str:
    v = q.get(key)
    return "-" if v is None else fmt.format(v)


def write_report(run: str, transcoders: list[dict[str, Any]], out_dir: Path) -> Path:
    """Write ``report.md`` and ``multiscale.png`` for ``run``'s transcoders; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in transcoders:
        if t["run"] == run:
            groups.setdefault((t["source"], t["target"]), []).append(t)
    lines = [f"# Transcoders of run `{run}`", ""]
    if not groups:
        lines.append("No transcoders yet: `interlatent train --run ...` makes some.")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (src, tgt), ts in sorted(groups.items()):
        ts = sorted(ts, key=lambda t: t["d_sae"])
        lines += [
            f"## `{src}` → `{tgt}`",
            "",
            "| latents | " + " | ".join(c[1] for c in _COLUMNS) + " |",
            "| ---: | " + " | ".join("---:" for _ in _COLUMNS) + " |",
        ]
        for t in ts:
            q = t.get("quality") or {}
            lines.append(f"| {t['d_sae']} | " + " | ".join(_cell(q, k, f) for k, _, f in _COLUMNS) + " |")
        lines.append("")
        label = f"{src} → {tgt}"
        sizes = [t["d_sae"] for t in ts]
        for ax, key, title in zip(
            axes,
            ("fvu", "l0", "return_recovered"),
            ("fraction of variance unexplained", "L0 (active latents per row)", "return recovered"),
            strict=True,
        ):
            vals = [(t.get("quality") or {}).get(key) for t in ts]
            pts = [(s, v) for s, v in zip(sizes, vals, strict=True) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ax.set_title(title)
            ax.set_xlabel("latents")
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "multiscale.png", dpi=110)
    plt.close(fig)
    lines += [
        "![multiscale comparison](multiscale.png)",
        "",
        "FVU: fraction of the target's variance the reconstruction misses. L0: mean active latents per row. "
        "Return recovered: (R_spliced - R_ablated) / (R_clean - R_ablated), with the transcoder spliced into the policy.",
    ]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md
