"""Chat templates shipped with k2serve (a package so that installs carry the .jinja files)."""
