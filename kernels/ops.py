"""The ops the models call: `kernels.ops.<name>(...)` for every op registered in kernels.registry.

This module's op functions are not written here: `kernels.registry.register(Op(...))` installs each op's
dispatcher under its name when the op's module is imported (kernels/__init__.py imports them all). A dispatcher
has its reference's signature and calls `kernels.registry.resolve(name, first argument)(*args)`.
`sorted(kernels.registry.registered())` lists them; docs/kernels.md has the table.
"""
from . import reference

__all__ = ["modulate"]  # register() appends each op's name

modulate = reference.modulate  # plain broadcast arithmetic, not an op: compile fuses it into its neighbours
