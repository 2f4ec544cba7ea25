"""What every command shares: one-line errors with exit code 2 for user mistakes."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from distcluster.common.errors import CorruptImage, RunFailed, Terminated, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


SKIP_HINT = "use --on-error skip to leave it out"
PREPARE_HINT = ("prepare the data with python -m distcluster.prepare SRC --out FILE.beton --on-error skip "
                "and pass the .beton")


def model_arguments(prog: str, doc: str) -> ArgumentParser:
    """The flags predict and evaluate share."""
    p = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model | DIR")
    p.add_argument("--data", required=True,
                   help="a data SPEC (digits, folder, .zip, .npz, .beton, cifar10:ROOT)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=0,
                   help="Ray Data actors assigning in parallel (0 = this process; GPU actors when "
                        "the cluster has GPUs)")
    p.add_argument("--tracking-uri", default="", help="MLflow URI for models:/ and runs:/ URIs")
    p.add_argument("--gpu", action="store_true", help="require a GPU (default: use one when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a corrupt image in a folder or zip stops the command (fail) or is left out (skip)")
    return p


def run_command(prog: str, body: Callable[[], object], corrupt_hint: str = SKIP_HINT) -> int:
    """Run a command body: 0 on success, 2 on a user mistake, 1 on a failed run or an internal error.
    `corrupt_hint`: how this command's user gets past a corrupt image."""
    try:
        body()
    except CorruptImage as exc:
        print(f"{prog}: error: {exc} ({corrupt_hint})", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{prog}: internal error (the traceback above is a bug report)", file=sys.stderr)
        return 1
    return 0
