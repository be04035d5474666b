"""The operator part of issue 6 §1.4, whose modules (bench.operator_reaction, bench.operator_footprint)
belong to the operator's engineers and take longer than the 10 minutes of a default run allow: asked
by name (`python -m bench operator`) it runs them; in the default run it prints how to.

What it must not do: print a figure it did not measure.
"""

from __future__ import annotations

from bench import report


def operator(out: report.Report, asked: bool, quick: bool) -> None:
    """Runs the operator's own bench modules when asked by name; otherwise says how to run them."""
    title = "The operator: reaction time and footprint (issue 6 §1.4)"
    if not asked:
        out.pending(
            "operator",
            title,
            "it would take the default run past 10 minutes; run `python -m bench operator`, or "
            "`python -m bench.operator_reaction` and `python -m bench.operator_footprint`",
            status="not measured in this run",
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
