"""The run report: ``logs/<run>/report.md`` and ``report.json`` from the stage folders of a run.

- :mod:`gcnee.report.collect` reads what each finished stage wrote (summaries, sweep, markers);
- :mod:`gcnee.report.ablations` runs or reuses the sibling runs ``eval.ablations`` asks for and
  tabulates the paper's Tables 2-4 and Figure 5;
- :mod:`gcnee.report.render` turns it all into markdown;
- :mod:`gcnee.report.stage` is the ``report`` stage (last in ``gcnee fit``) and ``gcnee report``.
"""
