"""What the registered guards are built from, not guards of their own: micro-batching, the
neutralising of judged text, the compliance-cue wrapper ``build_guard`` adds, and the collector
that exports a guard's counters."""
