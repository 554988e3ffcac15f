"""PLACEHOLDER (replaced wholesale by its owner)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("not implemented yet")
