"""``python -m bench.dashboard``: the command's short name; it runs ``bench.analysis.dashboard``."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("bench.analysis.dashboard", run_name="__main__", alter_sys=True)
