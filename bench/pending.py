"""The parts of issue 6 §1 that wait on other parts of the project. Each prints "not yet measured" with
what it will measure and what it waits for, so `python -m bench` shows the gap instead of a number.

What it must not do: print a figure. When a part lands, replace its hook here with a real module.
"""

from __future__ import annotations

from bench import report


def scale_in(out: report.Report) -> None:
    out.pending(
        "scale_in",
        "Scale-in under load (issue 6 §1.3)",
        "skipped with --quick (the demo's comparison takes about 3 minutes): `python -m bench scale-in`",
    )


def operator(out: report.Report, asked: bool, quick: bool) -> None:
    """Runs the operator's own bench modules when asked by name; otherwise says how to run them."""
    title = "The operator: reaction time and footprint (issue 6 §1.4)"
    if not asked:
        out.pending(
            "operator",
            title,
            "not in the default run (it would pass 10 minutes): `python -m bench operator`, or "
            "`python -m bench.operator_reaction` and `python -m bench.operator_footprint`",
        )
        return
    import importlib

    for name in ("bench.operator_reaction", "bench.operator_footprint"):
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            out.pending(name, title, f"{name} cannot be imported yet ({error})")
            continue
        module.run(out, module.QUICK if quick else module.FULL)
