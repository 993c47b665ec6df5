"""``python -m bench.pick``: the command's short name; it runs ``bench.analysis.pick``."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("bench.analysis.pick", run_name="__main__", alter_sys=True)
