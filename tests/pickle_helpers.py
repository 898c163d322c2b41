"""A hostile pickle, shared by the tests that check nothing unpickles what a network peer or a file holds."""

import os


class RunsCode:
    """Unpickling this creates `marker`: it stands for a hostile writer's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)
