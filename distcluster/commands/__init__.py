"""The command-line programs (`python -m distcluster.train|tune|predict|evaluate|prepare`) and what
they share: flags, one-line errors and exit codes. Nothing imports a command.
"""
