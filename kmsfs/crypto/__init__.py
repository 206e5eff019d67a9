"""Pure cryptographic core of kmsfs: content blocks, file names and symlink targets.

Everything here is a function over bytes: no files, no FUSE, no PKCS#11. The on-disk format these
modules implement is specified in ``docs/format.md``; each module's docstring repeats its part.
Nothing is re-exported here on purpose: import from the module that owns the structure.
"""
