"""What every room shares: errors with their exit codes and config-rule helpers, and files written atomically.
"""
