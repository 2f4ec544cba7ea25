"""A command's `main` run in-process, as the tests of its refusals use it (a real process's exit
code and stderr: test_config's test_a_real_process_exits_2)."""

from distcluster.common.errors import MAX_MESSAGE


def refused(command, argv: list[str], capsys) -> str:
    """Run a command's main in-process; it must exit 2 with one short line on stderr."""
    assert command.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and len(err) < MAX_MESSAGE + 60, err
    return err
