"""``python -m bench.report``: the command's short name; it runs ``bench.analysis.report``."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("bench.analysis.report", run_name="__main__", alter_sys=True)
