"""The exit-code contract of every command: 0 done, 2 and one sentence for the user's mistakes, 1 for bugs."""
import argparse
import sys
import traceback

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the command prints it as one sentence and exits with 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one sentence and exit code 2, like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(main, argv=None, failures=()) -> int:
    """Run `main(argv)` with the suite's exit codes: 0 done; 2 and one sentence for a UserError;
    1 and one sentence for the exception types in `failures`; 1 and a traceback for anything else (a bug)."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing unfinished was written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return 1
