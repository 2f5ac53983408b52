"""SVG figures with no dependency: side-by-side panels of lines against step. A run's curves.svg (training reward
and test accuracy, the paper's Figure 1) and the miniature's figures (mini_report.py) are all drawn by `svg_panels`."""
from __future__ import annotations

Line = tuple[str, bool, list[tuple[float, float]]]  # (color, dashed, [(step, value)])


def svg_panels(panels: list[tuple[str, list[Line]]], legend: list[tuple[str, str, bool]], title: str,
               ymax: float = 1.0, dots: bool = False) -> str:
    """Side-by-side panels, each (name, [(color, dashed, [(step, value)])]), values drawn within [0, ymax]; the legend
    (label, color, dashed) below them. `dots`: a dot on each point of a line of fewer than 40."""
    W, H, pad, top = 360, 280, 46, 30
    xmax = max([s for _, lines in panels for _, _, pts in lines for s, _ in pts] + [1])

    def xy(s, v):
        return pad + (W - pad - 10) * s / xmax, top + (H - top - pad) * (1 - min(max(v / ymax, 0.0), 1.0))

    body = []
    for i, (name, lines) in enumerate(panels):
        body += [f'<g transform="translate({i * W},0)"><text x="{W / 2}" y="20" text-anchor="middle" '
                 f'font-size="13">{name}</text>', f'<rect x="{pad}" y="{top}" width="{W - pad - 10}" '
                 f'height="{H - top - pad}" fill="none" stroke="#999"/>']
        for v in (0, 0.25, 0.5, 0.75, 1.0):
            body.append(f'<text x="{pad - 4}" y="{xy(0, v * ymax)[1] + 4:.1f}" text-anchor="end" '
                        f'font-size="11">{v * ymax:g}</text>')
        for s in (0, xmax // 2, xmax):
            body.append(f'<text x="{xy(s, 0)[0]:.1f}" y="{H - pad + 16}" text-anchor="middle" '
                        f'font-size="11">{s:g}</text>')
        body.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="12">step</text>')
        for color, dashed, pts in lines:
            if pts:
                line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in pts))
                dash = ' stroke-dasharray="6,4"' if dashed else ""
                body.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
                if dots and len(pts) < 40:
                    body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>'
                             for x, y in (xy(s, v) for s, v in pts)]
        body.append("</g>")
    width, column = len(panels) * W, 300  # legend columns wide enough for the longest label
    per_row = max(1, width // column)
    body += [f'<text x="{10 + column * (i % per_row)}" y="{H + 34 + 16 * (i // per_row)}" fill="{c}" '
             f'font-size="11">{label}{" (dashed)" if d else ""}</text>' for i, (label, c, d) in enumerate(legend)]
    height = H + 44 + 16 * ((len(legend) - 1) // per_row)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            f'<text x="{width / 2}" y="{H + 14}" text-anchor="middle" font-size="12">{title}</text>'
            + "".join(body) + "</svg>\n")


def moving_mean(values: list[float], n: int = 10) -> list[float]:
    """Each value's mean with the n − 1 before it (fewer at the start): the training reward's curve."""
    return [sum(values[max(0, i - n + 1): i + 1]) / len(values[max(0, i - n + 1): i + 1]) for i in range(len(values))]


def svg_plot(metrics: list[dict], evals: list[dict], title: str) -> str:
    """curves.svg: the training reward (moving mean over the last 10 steps) and the test accuracy against step."""
    smooth = list(zip([m["step"] for m in metrics], moving_mean([m["reward_mean"] for m in metrics])))
    accuracy = [(e["step"], e["accuracy"]) for e in evals]
    return svg_panels([("train reward (mean of 10 steps)", [("#1f77b4", False, smooth)]),
                       ("test accuracy", [("#d62728", False, accuracy)])], [], title, dots=True)
