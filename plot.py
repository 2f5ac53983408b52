"""An SVG of the training reward and the test accuracy against step (the paper's Figure 1), with no dependency."""
from __future__ import annotations



def svg_plot(metrics: list[dict], evals: list[dict], title: str) -> str:
    W, H, pad = 440, 300, 46

    def panel(x0, name, pts, color):
        out = [f'<g transform="translate({x0},0)"><text x="{W / 2}" y="20" text-anchor="middle">{name}</text>',
               f'<rect x="{pad}" y="30" width="{W - pad - 10}" height="{H - 30 - pad}" fill="none" stroke="#999"/>']
        xmax = max([p[0] for p in pts] + [1])

        def xy(s, v):
            return pad + (W - pad - 10) * s / xmax, 30 + (H - 30 - pad) * (1 - v)

        for v in (0, 0.25, 0.5, 0.75, 1.0):
            y = xy(0, v)[1]
            out.append(f'<text x="{pad - 4}" y="{y + 4}" text-anchor="end" font-size="11">{v:g}</text>')
        for s in (0, xmax // 2, xmax):
            x = xy(s, 0)[0]
            out.append(f'<text x="{x}" y="{H - pad + 16}" text-anchor="middle" font-size="11">{s}</text>')
        out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="12">step</text>')
        if pts:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, min(max(v, 0), 1)) for s, v in pts))
            out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>'
                    for x, y in (xy(s, v) for s, v in pts)] if len(pts) < 40 else []
        return out + ["</g>"]

    rewards = [m["reward_mean"] for m in metrics]
    smooth = [(m["step"], sum(rewards[max(0, i - 9): i + 1]) / len(rewards[max(0, i - 9): i + 1]))
              for i, m in enumerate(metrics)]  # moving mean over the last 10 steps
    acc = [(e["step"], e["accuracy"]) for e in evals]
    body = panel(0, "train reward (mean of 10 steps)", smooth, "#1f77b4") + \
        panel(W, "test accuracy", acc, "#d62728")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 20}" font-family="sans-serif">'
            f'<text x="{W}" y="{H + 14}" text-anchor="middle" font-size="12">{title}</text>'
            + "".join(body) + "</svg>\n")
