"""The core library of the reasoning guard: upstreams, step splitting, guards, the guarded
stream, correctors and case records. It knows nothing of HTTP frameworks or training."""

__version__ = "0.1.0"
