"""Compositions of the planes: `k2serve up` (`up`) and the in-process stack (`inproc`). The one package of the
shared floor that imports the planes; no plane imports it."""
