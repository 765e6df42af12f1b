"""results.json, and report.md and the figures rendered from it.

`write_all(res, workdir)` writes results.json, then renders report.md and the figures from
that file (and, for the image grid, from the attack parts it names), so the report is a
function of results.json: `render(workdir)` re-renders it at any time. report.md sets our
numbers beside the paper's (CIFAR-10, `../shared/PAPER_NOTES.md`) and gives each claim's
verdict with its test (`diffjax.study.verdicts`). The absolute numbers are not expected to
match on the embedded default (8x8 digits, a small U-Net): compare directions.
"""

from __future__ import annotations

import io
import json

import numpy as np

from diffjax import stats
from diffjax.study.workdir import as_path

__all__ = ["PAPER", "SCHEMA_KEYS", "config_to_dict", "render_markdown", "write_all", "render",
           "summary_lines"]

# The paper's CIFAR-10 numbers (PAPER_NOTES.md).
PAPER = {
    "l2_adv_input": "1.1-1.19", "l2_purified": "2.8-3.6", "ssim_adv_input": "~0.965",
    "ssim_purified": "0.79-0.87", "one_seed_eps_ball": "~0.995", "many_seeds_clean": "~0.24",
    "robustness_gain_fixed": "~24% (23.7%)", "robustness_gain_reported": "~70%",
    "transfer": "~77%", "gradient_correlation": "~0.17", "fraction_sv_below_0.25": "> 90%",
}

SCHEMA_KEYS = ("dataset", "num_examples", "clean_accuracy", "distances", "robust_accuracy",
               "gradient_correlation", "compression", "sigmoid_fit")


def config_to_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(
        o, (tuple, set)) else str(o)))


def _pct(v, ci=None) -> str:
    return "n/a" if v is None else stats.describe(v, ci or None)


def _acc(d: dict, name: str) -> str:
    return _pct(d.get(name), d.get(f"{name}_ci"))


def _p(v) -> str:
    return "n/a" if v is None else (f"{v:.2g}" if v >= 1e-4 else "<1e-4")


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_lines(res: dict) -> list[str]:
    """The claims' verdicts, one line each (what the main job prints at the end)."""
    return [f"claim {i}: {'Reproduced' if c['reproduced'] else 'Not reproduced'}. {c['text']}"
            for i, c in enumerate(res["claims"].values(), 1)]


def render_markdown(res: dict) -> str:
    """report.md from a results dict (as read from results.json)."""
    cfg = res.get("config", {})
    att, pur = cfg.get("attack", {}), cfg.get("purifier", {})
    und_att = cfg.get("attack_undefended", {})
    methods = list(res["distances"])
    ra, ca = res["robust_accuracy"], res["clean_accuracy"]
    parts = [
        "# diffjax study report", "",
        f"Dataset `{res['dataset']}`" + (" (synthetic data)" if res.get("synthetic_data")
                                         else "") +
        f", {res['num_examples']} {res.get('split', 'test')} examples; purifier t* = "
        f"{pur.get('t_star')}, {pur.get('num_steps')} reverse steps; attack "
        f"{att.get('cascade')} ({att.get('steps')} steps, {att.get('norm')} eps "
        f"{att.get('eps')}, {att.get('gradient')} gradients, early exit under fixed "
        f"randomness), EOT-{att.get('eot')} under `independent`, {cfg.get('eval_draws')} "
        f"evaluation draws; undefended: {und_att.get('cascade')} ({und_att.get('steps')} steps,"
        f" {und_att.get('targets')} targets); {res.get('devices', {}).get('count')} device(s); "
        f"{res.get('elapsed_s', 0):.0f} s.",
        "Every accuracy carries its 95% Wilson interval; every verdict its test at the 5% "
        "level (one-sided, in the paper's direction; Holm-adjusted within a claim). The "
        "paper's numbers are CIFAR-10 with DDPM++ and WRN-28-10; compare directions.", "",
        "## Claims", ""]
    for i, c in enumerate(res["claims"].values(), 1):
        parts.append(f"{i}. **{'Reproduced' if c['reproduced'] else 'Not reproduced'}.** "
                     f"{c['text']}")
    parts += ["", "## Accuracy (claim 3)", ""]
    rows = [["undefended", _acc(ca, "undefended"), _acc(ra, "undefended"), "", "", "", "", ""]]
    for m in methods:
        r = ra[m]
        gc = res["gradient_correlation_detail"].get(m, {})
        rows.append([m, _acc(ca, m), _acc(r, "fixed"), _acc(r, "transfer"),
                     _acc(r, "independent_eot"), _acc(r, "independent_mean_over_draws"),
                     f"{gc.get('mean', float('nan')):.3f}",
                     f"{_p(r['test_fixed_vs_independent']['p_value'])} / "
                     f"{_p(r['test_fixed_vs_transfer']['p_value'])}"])
    parts.append(_table(["purifier", "clean", "robust, fixed", "robust, transfer",
                         "robust, independent (EOT)", "independent, mean over draws",
                         "EOT-vs-fixed grad cosine", "McNemar p: fixed < independent / "
                         "transfer"], rows))
    ua = res.get("undefended_attack", {})
    parts += ["", f"Undefended attack: {ua.get('fooled_by_attack')} examples fooled by each "
              f"attack of the cascade in {[round(s, 1) for s in ua.get('attack_seconds', [])]}"
              f" s. Paper (CIFAR-10): robustness gain with fixed randomness "
              f"{PAPER['robustness_gain_fixed']} vs {PAPER['robustness_gain_reported']} "
              f"reported; transfer {PAPER['transfer']}; gradient cosine "
              f"{PAPER['gradient_correlation']}.", "", "## Distances to the clean image "
              "(claim 1)", ""]
    rows = []
    for m in methods:
        d = res["distances"][m]
        t = d["test_purified_farther"]
        rows.append([m, f"{d['l2_adv_input']:.3f}", f"{d['l2_purified']:.3f}",
                     f"{d['linf_purified']:.3f}", f"{d['ssim_adv_input']:.3f}",
                     f"{d['ssim_purified']:.3f}", f"{res['fid'][m]['adv_input']:.2f} -> "
                     f"{res['fid'][m]['purified']:.2f}",
                     f"{t['farther']}/{t['farther'] + t['closer'] + t['ties']} "
                     f"({_p(t['p_value'])})"])
    rows.append(["paper (CIFAR-10)", PAPER["l2_adv_input"], PAPER["l2_purified"], "",
                 PAPER["ssim_adv_input"], PAPER["ssim_purified"], "improves", ""])
    parts.append(_table(["purifier", "l2 adv input", "l2 purified", "linf purified",
                         "SSIM adv input", "SSIM purified", "FID adv -> purified",
                         "farther (sign test p)"], rows))
    parts += ["", "## Randomness (claim 2)", ""]
    rc = res["randomness_correlation"]
    rows = [[m, f"{rc[m]['one_seed_eps_ball']:.3f}", f"{rc[m]['many_seeds_clean']:.3f}",
             _p(rc[m]["test_one_seed_higher"]["p_value"])] for m in rc]
    rows.append(["paper (CIFAR-10)", PAPER["one_seed_eps_ball"], PAPER["many_seeds_clean"],
                 ""])
    parts.append(_table(["purifier", "corr. one seed (the realization), eps-ball points",
                         "corr. many seeds, clean image", "sign test p"], rows))
    parts += ["", "## Compression and robustness (claim 4)", "",
              "![compression vs robustness](compression_robustness.png)", ""]
    rows = []
    for p in res["compression"]:
        frac = p.get("fraction_sv_below_0.25")
        rows.append([p["method"], p["t_star"], f"{p['compression_rate']:.3f}",
                     "n/a" if frac is None else f"{100 * frac:.0f}%",
                     _acc(p, "robust_accuracy_fixed"), _acc(p, "clean_accuracy"),
                     p.get("num_attack_examples"), "yes" if p.get("in_fit", True) else "no"])
    parts.append(_table(["method", "t*", "compression rate (RMS sv)", "sv < 0.25",
                         "robust (fixed)", "clean", "examples", "in fit"], rows))
    fit = res.get("sigmoid_fit") or {}
    if fit.get("params") is not None:
        parts += ["", f"Logistic fit: {json.dumps(fit.get('params'))}, R^2 = {fit['r2']:.3f}"
                  + (f" (bootstrap 95% [{fit['r2_ci'][0]:.2f}, {fit['r2_ci'][1]:.2f}])"
                     if fit.get("r2_ci") and fit["r2_ci"][0] is not None else "") + "."]
    else:
        parts += ["", f"Logistic fit: not available ({fit.get('error', 'n/a')})."]
    if res.get("audit"):
        parts += ["", "## Gradient-masking audit", ""]
        for m, a in res["audit"].items():
            parts += [f"**{m}** ({a['n']} examples): {a['verdict']['sentence']}.", ""]
            rows = [[r["check"], r["attack"], _acc({"v": r["robust"], "v_ci": r["ci"]}, "v"),
                     f"{100 * r['delta_vs_study']:+.1f}", _p(r["p_value_lower"]),
                     r["iterations"]] for r in a["rows"]]
            parts.append(_table(["check", "attack", "robust accuracy", "vs study (pts)",
                                 "p (lower)", "attack iterations"], rows))
            parts.append("")
    cons = res.get("consistency", {})
    if cons:
        parts += ["", "## One realization per example", "",
                  "Every fixed verdict is the attack's own success under the example's "
                  "realization: " + ", ".join(
                      f"{m} {'yes' if c['fixed_verdict_is_the_attacks_own'] else 'NO'}"
                      for m, c in cons.items()) + "."]
    costs = res.get("costs", {})
    if costs.get("parts"):
        parts += ["", "## Cost per part", ""]
        rows = [[k, f"{v['wall_s']:.1f}", f"{v['compile_s']:.1f}", f"{v['run_s']:.1f}"]
                for k, v in sorted(costs["parts"].items(), key=lambda kv: -kv[1]["wall_s"])]
        t = costs["total"]
        rows.append(["total", f"{t['wall_s']:.1f}", f"{t['compile_s']:.1f}", f"{t['run_s']:.1f}"])
        parts.append(_table(["part", "wall s", "compiling s", "running s"], rows))
    parts += ["", "## Figures", "", "![distances](distances.png)", "",
              "![clean / adversarial / purified](examples.png)", ""]
    return "\n".join(parts)


def _figures(res: dict, out, images: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffjax import analysis

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        (out / name).write_bytes(buf.getvalue())

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, m in enumerate(sorted({p["method"] for p in res["compression"]})):
        pts = [p for p in res["compression"] if p["method"] == m]
        color = f"C{i}"
        for used in (True, False):
            sel = [p for p in pts if p.get("in_fit", True) == used]
            if sel:
                x = [p["compression_rate"] for p in sel]
                y = [p["robust_accuracy_fixed"] for p in sel]
                err = np.array([[p["robust_accuracy_fixed"] - p["robust_accuracy_fixed_ci"][0],
                                 p["robust_accuracy_fixed_ci"][1] - p["robust_accuracy_fixed"]]
                                for p in sel]).T
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=color, alpha=0.4, lw=0.8)
                ax.scatter(x, y, edgecolors=color, facecolors=color if used else "none",
                           label=m if used else f"{m} (not in fit: clean acc. lost)")
        for p in pts:
            ax.annotate(str(p["t_star"]), (p["compression_rate"], p["robust_accuracy_fixed"]),
                        fontsize=7)
    und = res["robust_accuracy"]["undefended"]
    ax.scatter([1.0], [und], marker="x", color="k", label="undefended (rate 1)")
    fit = res.get("sigmoid_fit") or {}
    if fit.get("params") is not None:
        grid = np.linspace(0, max(1.0, max(p["compression_rate"] for p in res["compression"])),
                           200)
        ax.plot(grid, analysis.sigmoid(grid, **fit["params"]), "k--",
                label=f"logistic fit, R$^2$={fit['r2']:.2f}")
    ax.axhline(und, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("compression rate (RMS Jacobian singular value)")
    ax.set_ylabel("robust accuracy, fixed randomness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "compression_robustness.png")

    per = res.get("distances_per_example", {})
    methods = list(per)
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 2.8),
                             squeeze=False)
    for ax, m in zip(axes[0], methods, strict=False):
        ax.hist(per[m]["adv_input"], bins=20, alpha=0.6, label="adversarial input")
        ax.hist(per[m]["purified"], bins=20, alpha=0.6, label="purified")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("l2 distance to clean")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, "distances.png")

    rows = []
    for m, imgs in images.items():
        if not rows:
            rows.append(("clean", imgs["img_clean"]))
        rows += [(f"adv ({m})", imgs["img_x_adv"]), (f"purified ({m})",
                                                     imgs["img_purified_adv"])]
    if not rows:
        return
    k = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), max(k, 1), figsize=(1.1 * k + 1.5, 1.1 * len(rows)),
                             squeeze=False)
    for r, (label, batch) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            img = np.asarray(batch[c])
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    save(fig, "examples.png")


def render(workdir) -> dict:
    """Renders report.md and the figures from WORKDIR/results.json (and the image parts)."""
    out = as_path(workdir)
    res = json.loads((out / "results.json").read_text())
    images = {}
    for m, name in (res.get("figure_examples") or {}).items():
        path = out / "parts" / f"{name}.npz"
        if path.exists():
            with np.load(io.BytesIO(path.read_bytes())) as z:
                images[m] = {k: z[k] for k in z.files if k.startswith("img_")}
    (out / "report.md").write_text(render_markdown(res))
    _figures(res, out, images)
    return {"results": out / "results.json", "report": out / "report.md",
            **{n: out / f"{n}.png" for n in ("compression_robustness", "distances",
                                              "examples")}}


def write_all(res: dict, workdir) -> dict:
    """Writes results.json, then report.md and the PNG figures rendered from it."""
    out = as_path(workdir)
    missing = [k for k in SCHEMA_KEYS if k not in res]
    if missing:
        raise ValueError(f"results are missing schema keys {missing}")
    (out / "results.json").write_text(json.dumps(res, indent=2, sort_keys=True, default=float))
    return render(out)
