"""The shadow-phase options `push` and `rollout start` share (docs/ota.md#shadow-evaluation)."""
from __future__ import annotations

import click

OPTIONS = (
    click.option("--shadow", "shadow_s", type=float, metavar="SECONDS",
                 help="Before switching, run the new model beside the serving one on sampled live requests for "
                      "SECONDS; switch only if it agrees (off by default)."),
    click.option("--shadow-rate", type=float, default=0.1, show_default=True,
                 help="Share of live requests also run on the new model during the shadow phase."),
    click.option("--min-shadow-agreement", type=float, default=0.95, show_default=True,
                 help="Top-1 agreement (class scores), else share of outputs with cosine >= 0.99, needed to switch."),
    click.option("--shadow-min-samples", type=int, default=20, show_default=True,
                 help="Fewer compared requests in the shadow phase: rejected (not enough evidence)."),
)


def shadow_options(f):
    for option in reversed(OPTIONS):
        f = option(f)
    return f


def shadow_from_options(kw: dict):
    """The record's shadow section from the options (popped from `kw`); None without --shadow."""
    from edgeproto.desired import Shadow

    s = kw.pop("shadow_s"), kw.pop("shadow_rate"), kw.pop("min_shadow_agreement"), kw.pop("shadow_min_samples")
    if s[0] is None:
        return None
    if not (0 < s[1] <= 1 and 0 <= s[2] <= 1 and s[3] >= 1 and s[0] >= 1):
        raise click.BadParameter("--shadow >= 1 s, 0 < --shadow-rate <= 1, 0 <= --min-shadow-agreement <= 1, "
                                 "--shadow-min-samples >= 1")
    return Shadow(seconds=s[0], rate=s[1], min_agreement=s[2], min_samples=s[3])
