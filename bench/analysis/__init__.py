"""The analysis side: everything that reads result records and nothing that measures.

    common.py       labels, the settings that vary across records, power-law fits
    report.py       Markdown/CSV tables (``python -m bench.report``)
    html_report.py  a self-contained HTML page with plots (``python -m bench.report PATH --html F``)
    pick.py         a recommendation for one length and budget (``python -m bench.pick``)
    dashboard.py    a W&B workspace over a project's runs (``python -m bench.dashboard``)

Imports go one way: common <- report, html_report, pick; report -> html_report (for --html).
"""
