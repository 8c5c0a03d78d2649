"""A factory module that fails as it is imported (a missing config key), for the one-line error."""

raise KeyError("config key 'checkpoint' is missing")


def make():  # never reached
    return None
