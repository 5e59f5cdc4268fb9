"""Helper for test_cli_bad_inputs: runs several command lines of ONE CLI in this one process (a jax start-up per
CLI instead of per row) and prints, per row, one JSON line {"code": exit code, "stderr": what it wrote}.

    python tests/_cli_rows.py MODULE < ROWS.json      # ROWS.json: a JSON list of argv lists, e.g. [["--x", "1"]]

Each row calls MODULE.main(argv) as `python -m MODULE` would (SystemExit caught, its code kept); an exception that
escapes main() is printed as Python prints it ("Traceback ...") and counts as exit code 1, so a row that would
crash the real command fails its test the same way.
"""

import contextlib
import importlib
import io
import json
import sys
import traceback


def run_row(main, argv: list[str]) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - reported like the interpreter would, then judged by the test
            traceback.print_exc(file=err)
            code = 1
    return {"code": code, "stderr": err.getvalue()}


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    for argv in json.load(sys.stdin):
        print(json.dumps(run_row(module.main, argv)), flush=True)


if __name__ == "__main__":
    main()
