#!/usr/bin/env python3
"""Draws the chart at the top of BENCHMARKS.md: instructions per request of this layer
against the alternatives a user would otherwise reach for.

    python3 benches/chart.py                      # benches/instructions.budget -> benches/comparison.svg
    python3 benches/chart.py BUDGET -o OUT.svg    # another budget file, another output
    python3 benches/chart.py --check              # fails when the SVG is not what the budget draws

The numbers are the rows of `benches/instructions.budget`, which `.ci/instruction-gate
--update` writes from a run of `cargo bench --bench instructions` (callgrind's count of
each benchmark divided by the requests it sends) and which CI holds every run to. So
the chart shows the counts CI enforces, not a separate measurement. Run this script
after every `--update` and commit the SVG with the budget.

Python's standard library only; the SVG is written by hand, with no timestamp, so the
same budget always draws the same file.
"""

import argparse
import os
import sys
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BUDGET = os.path.join(HERE, "instructions.budget")
DEFAULT_OUTPUT = os.path.join(HERE, "comparison.svg")

LAYER, ALTERNATIVE, BASELINE = "layer", "alternative", "baseline"
COLOURS = {LAYER: "#2b6cb0", ALTERNATIVE: "#dd8a2b", BASELINE: "#8a8f98"}
LEGEND = [
    (LAYER, "this layer, tower-sync-engine"),
    (ALTERNATIVE, "what a user would write instead"),
    (BASELINE, "no layer at all"),
]

# What each budget row measures (see benches/instructions.rs), grouped by the question a
# reader asks. Every benchmark sends 1,000 requests to an echo service with `u64` keys.
GROUPS = [
    (
        "A request that needs no order",
        [
            ("raw_service_fn", "the service called directly", BASELINE),
            ("layer_concurrent.default_hasher", "layer, Mode::Concurrent", LAYER),
        ],
    ),
    (
        "One request at a time per key, the key free",
        [
            ("concurrency_limit_1.one", "tower ConcurrencyLimit(1): one line for all, no keys", ALTERNATIVE),
            ("layer_sync_new_key_foldhash.fast_hasher", "layer, Mode::Sync, new key, foldhash", LAYER),
            ("layer_sync_one_key.default_hasher", "layer, Mode::Sync, one key, one after another", LAYER),
            ("layer_sync_new_key.default_hasher", "layer, Mode::Sync, new key (SipHash, the default)", LAYER),
            ("map_of_mutexes_new_key", "a map of tokio mutexes, new key", ALTERNATIVE),
        ],
    ),
    (
        "The key busy: wait behind the request before",
        [
            ("layer_sync_live_key.default_hasher", "layer, Mode::Sync, key already live", LAYER),
        ],
    ),
    (
        "Handing one key on to the next of 1,000 queued",
        [
            ("hand_off_semaphore", "tokio Semaphore(1)", ALTERNATIVE),
            ("hand_off_layer.default_hasher", "layer", LAYER),
        ],
    ),
]
OTHER_GROUP = "Other rows of the budget"

TITLE = "Instructions per request: tower-sync-engine and its alternatives"
SUBTITLE = "callgrind through gungraun (cargo bench --bench instructions); fewer is better"
FOOTER = "the counts CI's instruction gate holds every run to (.ci/instruction-gate)."

WIDTH = 860
MARGIN = 20
ROW = 24
BAR = 16
GROUP_GAP = 10
FONT = 12


def read_budget(path):
    """The budget's rows, in file order: `name instructions_per_request`."""
    rows = {}
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                sys.exit(f"chart: {path}:{number}: want `name instructions`")
            try:
                rows[fields[0]] = float(fields[1])
            except ValueError:
                sys.exit(f"chart: {path}:{number}: {fields[1]!r} is not a number")
    if not rows:
        sys.exit(f"chart: {path} has no rows")
    return rows


def grouped(rows):
    """The configured groups with the rows the budget has; rows the configuration does not
    know are drawn in a group of their own under their budget names, so that a new
    benchmark shows up rather than going missing."""
    groups = []
    known = set()
    for title, members in GROUPS:
        present = []
        for name, label, kind in members:
            known.add(name)
            if name in rows:
                present.append((label, kind, rows[name]))
            else:
                print(f"chart: no row {name} in the budget; left out", file=sys.stderr)
        if present:
            groups.append((title, present))
    other = [
        (name, LAYER if "layer" in name else ALTERNATIVE, value)
        for name, value in rows.items()
        if name not in known
    ]
    if other:
        groups.append((OTHER_GROUP, other))
    return groups


def text_width(text, size=FONT):
    """An upper estimate of the width of `text` in DejaVu Sans, the widest of the usual
    sans-serif fonts, so that labels never run into the bars."""
    width = 0.0
    for char in text:
        if char in "il.,:;'|!()[]jftr ":
            width += 0.36
        elif char.isupper() or char in "mw":
            width += 0.78
        elif char.isdigit():
            width += 0.64
        else:
            width += 0.62
    return width * size


def nice_step(top):
    """A round tick step giving five to ten ticks up to `top`."""
    magnitude = 1
    while magnitude * 10 <= top:
        magnitude *= 10
    for factor in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5):
        step = magnitude * factor
        if top / step <= 10:
            return step
    return magnitude * 10


def fmt(value):
    """`1518.7` as `1,519`: whole instructions, as BENCHMARKS.md's tables print them."""
    return f"{round(value):,}"


def render(rows, source_name):
    groups = grouped(rows)
    labels = [label for _, members in groups for label, _, _ in members]
    label_width = max(text_width(label) for label in labels)
    bar_left = MARGIN + label_width + 10
    # Room after the longest bar for its value.
    bar_room = WIDTH - MARGIN - bar_left - text_width("00,000") - 8
    top = max(value for _, members in groups for _, _, value in members)
    step = nice_step(top)
    axis_max = step * -(-top // step)
    scale = bar_room / axis_max

    out = []
    y = MARGIN + 16
    out.append(f'<text x="{MARGIN}" y="{y}" font-size="16" font-weight="bold">{escape(TITLE)}</text>')
    y += 20
    out.append(f'<text x="{MARGIN}" y="{y}" fill="#555">{escape(SUBTITLE)}</text>')
    y += 22
    x = MARGIN
    for kind, name in LEGEND:
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{COLOURS[kind]}"/>')
        out.append(f'<text x="{x + 18}" y="{y}">{escape(name)}</text>')
        x += 18 + text_width(name) + 24
    y += 12

    body = []
    # Each group's rows, top and bottom: the grid is drawn there only, clear of the headings.
    spans = []
    for title, members in groups:
        y += GROUP_GAP + 14
        body.append(f'<text x="{MARGIN}" y="{y}" font-weight="bold">{escape(title)}</text>')
        y += 6
        spans.append((y, y + ROW * len(members)))
        for label, kind, value in members:
            bar_y = y + (ROW - BAR) / 2
            text_y = y + ROW / 2 + FONT * 0.35
            length = max(value * scale, 1)
            body.append(
                f'<text x="{bar_left - 10:.1f}" y="{text_y:.1f}" text-anchor="end">{escape(label)}</text>'
            )
            body.append(
                f'<rect x="{bar_left:.1f}" y="{bar_y:.1f}" width="{length:.1f}" height="{BAR}" '
                f'fill="{COLOURS[kind]}"><title>{escape(label)}: {value:.1f}</title></rect>'
            )
            body.append(
                f'<text x="{bar_left + length + 5:.1f}" y="{text_y:.1f}">{fmt(value)}</text>'
            )
            y += ROW
    chart_bottom = y + 4

    # Grid lines behind the bars, and the axis's tick labels under them.
    grid = []
    tick = 0
    while tick <= axis_max:
        x = bar_left + tick * scale
        colour = "#999" if tick == 0 else "#e3e3e3"
        for span_top, span_bottom in spans:
            grid.append(
                f'<line x1="{x:.1f}" y1="{span_top}" x2="{x:.1f}" y2="{span_bottom}" stroke="{colour}"/>'
            )
        grid.append(
            f'<text x="{x:.1f}" y="{chart_bottom + 15}" text-anchor="middle" fill="#555">{fmt(tick)}</text>'
        )
        tick += step
    y = chart_bottom + 36
    out += grid + body
    for line in (f"From {source_name}: {FOOTER}", f"Drawn by python3 benches/chart.py {source_name}"):
        out.append(f'<text x="{MARGIN}" y="{y}" font-size="11" fill="#555">{escape(line)}</text>')
        y += 15
    height = y + MARGIN - 20

    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(TITLE)}" '
        f"font-family=\"'DejaVu Sans', Verdana, Arial, sans-serif\" font-size=\"{FONT}\" fill=\"#222\">"
    )
    # An opaque background, so that the dark text reads on a dark page too.
    background = f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>'
    return "\n".join([head, f"<title>{escape(TITLE)}</title>", background, *out, "</svg>"]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("budget", nargs="?", default=DEFAULT_BUDGET, help="the budget file to draw")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="where to write the SVG")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; fail when OUTPUT differs from what the budget draws",
    )
    args = parser.parse_args()

    # The footer names the budget as the repository does, wherever the script runs from.
    root = os.path.dirname(HERE)
    source = os.path.abspath(args.budget)
    source_name = os.path.relpath(source, root) if source.startswith(root + os.sep) else args.budget
    svg = render(read_budget(args.budget), source_name)

    if args.check:
        try:
            with open(args.output) as existing:
                current = existing.read()
        except FileNotFoundError:
            current = None
        if current != svg:
            sys.exit(f"chart: {args.output} is not what {args.budget} draws: run python3 benches/chart.py")
        return
    with open(args.output, "w") as out:
        out.write(svg)


if __name__ == "__main__":
    main()
